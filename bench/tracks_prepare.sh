#!/usr/bin/env bash
# Gather what bench/tracks_device.sh needs on the GPU machine (run here, in the repo root, before the device
# call), into two git-ignored folders the call carries:
#   .whl-tracks/        the wheels of bench/tracks-wheels.txt (cp312, manylinux x86-64), ~38 MB
#   .carry-tracks/smollm2/  SmolLM2-135M-Instruct's config and tokenizer (no weights: the device builds a
#                       random-init model of that shape, bench/random_base_model.py), ~2 MB
# Wheels are copied from WHEEL_DIRS (folders already holding some) and the rest downloaded with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WHEEL_DIRS=${WHEEL_DIRS:-"/tmp/pfw .whl"}
mkdir -p .whl-tracks .carry-tracks/smollm2
for d in /.whl-tracks/ /.carry-tracks/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> "$(git rev-parse --git-path info/exclude)"; done

norm() { echo "$1" | tr 'A-Z-.' 'a-z__'; }
missing=()
while read -r pin; do
  case "$pin" in ''|'#'*) continue;; esac
  name=${pin%%==*}; version=${pin##*==}; stem="$(norm "$name")-${version}-"
  found=""
  for d in $WHEEL_DIRS; do
    for f in "$d"/*.whl; do
      [ -e "$f" ] || continue
      base=$(basename "$f"); lower=$(echo "$base" | tr 'A-Z' 'a-z')
      if [[ "$lower" == "$stem"* ]]; then found="$f"; break 2; fi
    done
  done
  if [ -n "$found" ]; then cp -n "$found" .whl-tracks/; else missing+=("$pin"); fi
done < bench/tracks-wheels.txt
if [ ${#missing[@]} -gt 0 ]; then
  echo "downloading ${#missing[@]}: ${missing[*]}"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl-tracks "${missing[@]}"
fi
# One version of each package: two stop the whole install there.
extra=$(ls .whl-tracks | awk -F- '{print tolower($1)}' | sort | uniq -d)
[ -z "$extra" ] || { echo "two versions of: $extra (empty .whl-tracks/ and run again)" >&2; exit 1; }

base=$("$PY" -c "from tasks.models.bootstrap import resolve_base_model; from tasks.recipe import ModelConfig; print(resolve_base_model(ModelConfig()))")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -e "$base/$f" ] && cp "$base/$f" .carry-tracks/smollm2/
done
echo "wheels: $(ls .whl-tracks | wc -l) files, $(du -sh .whl-tracks | cut -f1); model files: $(du -sh .carry-tracks | cut -f1)"
echo "wanted: $(grep -c '==' bench/tracks-wheels.txt) pins"
