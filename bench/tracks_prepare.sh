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

source bench/gather_wheels.sh   # gather LIST DEST: copied from WHEEL_DIRS, or downloaded
gather bench/tracks-wheels.txt .whl-tracks
# One version of each package: two stop the whole install there.
extra=$(ls .whl-tracks | awk -F- '{print tolower($1)}' | sort | uniq -d)
[ -z "$extra" ] || { echo "two versions of: $extra (empty .whl-tracks/ and run again)" >&2; exit 1; }

base=$("$PY" -c "from tasks.models.bootstrap import resolve_base_model; from tasks.recipe import ModelConfig; print(resolve_base_model(ModelConfig()))")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -e "$base/$f" ] && cp "$base/$f" .carry-tracks/smollm2/
done
echo "wheels: $(ls .whl-tracks | wc -l) files, $(du -sh .whl-tracks | cut -f1); model files: $(du -sh .carry-tracks | cut -f1)"
echo "wanted: $(grep -c '==' bench/tracks-wheels.txt) pins"
