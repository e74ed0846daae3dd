# Sourced by bench/gpu_prepare.sh and bench/tracks_prepare.sh (needs $PY and $WHEEL_DIRS set).
norm() { echo "$1" | tr 'A-Z-.' 'a-z__'; }
# gather LIST DEST: each NAME==VERSION of LIST as a wheel (or sdist) in DEST
gather() {
  local missing=() pin name version stem found f base lower
  while read -r pin; do
    case "$pin" in ''|'#'*) continue;; esac
    name=${pin%%==*}; version=${pin##*==}; stem="$(norm "$name")-${version}"
    found=""
    for d in $WHEEL_DIRS; do
      for f in "$d"/*.whl "$d"/*.tar.gz; do
        [ -e "$f" ] || continue
        base=$(basename "$f"); lower=$(echo "$base" | tr 'A-Z' 'a-z')
        if [[ "$lower" == "$stem"-* || "$lower" == "$stem".tar.gz ]]; then found="$f"; break 2; fi
      done
    done
    if [ -n "$found" ]; then cp "$found" "$2/"; else missing+=("$pin"); fi
  done < "$1"
  if [ ${#missing[@]} -gt 0 ]; then
    echo "downloading ${#missing[@]}: ${missing[*]}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$2" "${missing[@]}"
  fi
}
