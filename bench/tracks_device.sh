#!/usr/bin/env bash
# Two tracks in parallel on GPU work pools of their own vs one after the other on every GPU, on one GPU host,
# through a real Prefect server, `slipway deploy --gpus N` and one process worker per pool (bench/README-tracks.md).
#
#   bash bench/tracks_prepare.sh          # here: wheels -> .whl-tracks/, SmolLM2 config+tokenizer -> .carry-tracks/
#   device run (nvidia-h200-x2), carry [".whl-tracks", ".carry-tracks"]:
#     bash bench/tracks_device.sh         # prints both reports and the wall-time comparison; files in $OUT
#
# Budget ~8 minutes in one shot: every step is timed and bounded, the servers are stopped on exit, and what
# was written so far lands in $OUT whatever happens. Knobs (environment): EPOCHS (training epochs per track,
# default 20), TRACK_FLOW (train: training only, default; finetune needs llama.cpp on the host), HOST_GPUS
# (default: torch's GPU count), TRACKS_TIMEOUT (seconds per layout, default 200), SKIP_INSTALL=1 (wheels
# already importable), PY (default python3), PORT (default 4200), EXTRA_SETS (more recipe overrides,
# space-separated FIELD=VALUE: the CPU dry run uses "training.max_steps=2 data.train_rows=4").
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PY:-python3}
OUT=${OUT:-/tmp/tracks-out}
WORK=${WORK:-/tmp/tracks-work}
EPOCHS=${EPOCHS:-20}
TRACK_FLOW=${TRACK_FLOW:-train}
TRACKS_TIMEOUT=${TRACKS_TIMEOUT:-200}
PORT=${PORT:-4200}
mkdir -p "$OUT"
rm -rf "$WORK"; mkdir -p "$WORK"
# Keep NVLink multicast off (the host's GPUs are shared), in every process this starts too.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
say() { echo "[tracks +$(( $(date +%s) - T0 ))s] $*"; }
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
  sleep 2
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
  # Up to 8 flat files come back: the two reports, the comparison, the logs (tails).
  for f in tracks-parallel.md tracks-sequential.md; do [ -e "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"; done
  [ -e "$WORK/runs/sequential/tracks-report.json" ] && cp "$WORK/runs/sequential/tracks-report.json" "$OUT/tracks-report.json"
  { for f in "$WORK"/*.log; do echo "=== $(basename "$f")"; tail -n 60 "$f"; done; } > "$OUT/logs.txt" 2>/dev/null
  for run in "$WORK"/runs/*/*/metrics/train.log; do [ -e "$run" ] && { echo "=== $run"; tail -n 25 "$run"; }; done \
    > "$OUT/train-logs.txt" 2>/dev/null
  say "done; files in $OUT"
}
trap cleanup EXIT

# 1. Wheels (prefect + its dependencies, trl, datasets): bench/tracks-wheels.txt.
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-tracks/*.whl \
    > "$WORK/pip.log" 2>&1 || { say "wheel install failed"; cat "$WORK/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
say "wheels installed"

# 2. Preflight: every import the flows and the training worker need, prefect's own requirements met, the GPUs.
$PY - <<'EOF' || { say "preflight failed"; exit 1; }
import importlib, importlib.metadata as md, sys
from packaging.requirements import Requirement
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "matplotlib", "prefect", "pydantic",
             "jsonschema", "yaml", "typer", "flows.tracks", "flows.train", "flows.cli", "deployments.up"):
    importlib.import_module(name)
missing, off = [], []
for text in md.requires("prefect") or []:
    req = Requirement(text)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        if not req.specifier.contains(md.version(req.name), prereleases=True):
            off.append(f"{req.name} {md.version(req.name)} (wants {req.specifier})")
    except md.PackageNotFoundError:
        missing.append(req.name)
import torch, transformers, trl, prefect
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, prefect {prefect.__version__}, GPUs {torch.cuda.device_count()}: "
      f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
if off:   # the image's own version of a package left out of the wheels: usually fine, said in case it is not
    print("WARNING: prefect wants other versions of:", "; ".join(off))
if missing:
    print("prefect requirements missing:", ", ".join(missing))
    sys.exit(1)
EOF
CUDA_GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
HOST_GPUS=${HOST_GPUS:-$CUDA_GPUS}   # a CPU dry run sets it to lay the pools out as on the GPU host
say "preflight ok; laying the pools out for $HOST_GPUS GPU(s)"

# 3. The base model: SmolLM2-135M's shape and tokenizer, random weights (nothing can be downloaded there).
$PY bench/random_base_model.py .carry-tracks/smollm2 "$WORK/smollm2-random" --dtype bfloat16 > "$WORK/base.log" 2>&1 \
  || { say "base model failed"; tail -20 "$WORK/base.log"; exit 1; }
say "$(tail -1 "$WORK/base.log")"

# 4. Prefect: a server on loopback, the pools/blocks/deployments of `slipway deploy --gpus N`, a worker per pool.
export PREFECT_HOME=$WORK/prefect-home PREFECT_API_URL=http://127.0.0.1:$PORT/api PREFECT_SERVER_ANALYTICS_ENABLED=false \
  PREFECT_SERVER_UI_ENABLED=false PREFECT_WORKER_QUERY_SECONDS=2 PREFECT_LOGGING_LEVEL=INFO
setsid $PY -m prefect server start --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 &
PIDS+=($!)
timeout 120 $PY -m prefect server status --wait --timeout 110 > "$WORK/status.log" 2>&1 \
  || { say "server did not start"; tail -30 "$WORK/server.log"; exit 1; }
say "server up"
timeout 240 $PY -m deployments.up --gpus "$HOST_GPUS" > "$WORK/deploy.log" 2>&1 \
  || { say "deploy failed"; tail -40 "$WORK/deploy.log"; exit 1; }
grep "^work pool" "$WORK/deploy.log"
for pool in gpu-a gpu-b gpu-all; do
  setsid $PY -m prefect worker start --pool "$pool" --limit 1 > "$WORK/worker-$pool.log" 2>&1 &
  PIDS+=($!)
done
say "deployed; workers started"

# 5. The tracks: the Fledgling recipes on the GPUs, bf16, EPOCHS epochs of every training row. In parallel each
# pool has half the GPUs (one on a 2-GPU host: one process; DDP where a pool has more); in turn, DDP on all.
COMMON=(--flow "$TRACK_FLOW" --output-root "$WORK/runs"
        --set model.source=hf --set "model.name=$WORK/smollm2-random" --set model.dtype=bfloat16
        --set training.mixed_precision=auto --set training.max_steps=-1 --set "training.epochs=$EPOCHS"
        --set training.save_steps=100000 --set training.logging_steps=20)
for extra in ${EXTRA_SETS:-}; do COMMON+=(--set "$extra"); done
per_pool=$(( CUDA_GPUS / 2 ))
PARALLEL_SETS=(); [ "$per_pool" -gt 1 ] && PARALLEL_SETS=(--set training.accelerate_config=ddp)
SEQUENTIAL_SETS=(); [ "$CUDA_GPUS" -gt 1 ] && SEQUENTIAL_SETS=(--set training.accelerate_config=ddp)

say "parallel layout: a track per pool (gpu-a, gpu-b)"
timeout "$TRACKS_TIMEOUT" $PY -m flows.cli tracks --layout parallel --run-name parallel "${COMMON[@]}" \
  "${PARALLEL_SETS[@]}" > "$WORK/tracks-parallel.log" 2>&1
say "parallel exit $? ($(grep -E '^(Report|Run failed)' "$WORK/tracks-parallel.log" | tr '\n' ' '))"
[ -e "$WORK/runs/parallel/tracks-report.md" ] && cp "$WORK/runs/parallel/tracks-report.md" "$WORK/tracks-parallel.md"

say "sequential layout: one track after the other on gpu-all"
COMPARE=(); [ -e "$WORK/runs/parallel/tracks-report.json" ] && COMPARE=(--compare-with "$WORK/runs/parallel")
timeout "$TRACKS_TIMEOUT" $PY -m flows.cli tracks --layout sequential --run-name sequential "${COMMON[@]}" \
  "${SEQUENTIAL_SETS[@]}" "${COMPARE[@]}" > "$WORK/tracks-sequential.log" 2>&1
say "sequential exit $? ($(grep -E '^(Report|Run failed)' "$WORK/tracks-sequential.log" | tr '\n' ' '))"
[ -e "$WORK/runs/sequential/tracks-report.md" ] && cp "$WORK/runs/sequential/tracks-report.md" "$WORK/tracks-sequential.md"

# 6. The figures.
for layout in parallel sequential; do
  echo; echo "=================== $layout"
  cat "$WORK/tracks-$layout.md" 2>/dev/null || tail -40 "$WORK/tracks-$layout.log"
done
$PY - "$WORK/runs" <<'EOF'
import json, sys
from pathlib import Path
rows = {}
for layout in ("parallel", "sequential"):
    path = Path(sys.argv[1]) / layout / "tracks-report.json"
    if path.exists():
        rows[layout] = json.loads(path.read_text())
print("\nlayout      wall s   sum of runs s   tokens/s per GPU (mean)   tracks (pool: CUDA_VISIBLE_DEVICES, processes, train s)")
for layout, r in rows.items():
    tracks = "; ".join(f"{t['track']} ({t['work_pool']}: {t['cuda_visible_devices']}, {t['processes']}, "
                       f"{t['train_seconds']})" for t in r["tracks"])
    rate = r["mean_tokens_per_second_per_process"]
    print(f"{layout:10} {r['wall_seconds'] or 0:7.1f} {r['sum_run_seconds']:15.1f} {rate or 0:25,.0f}   {tracks}")
if len(rows) == 2 and rows["parallel"]["wall_seconds"] and rows["sequential"]["wall_seconds"]:
    print(f"parallel / sequential wall time: {rows['parallel']['wall_seconds'] / rows['sequential']['wall_seconds']:.2f}x")
EOF
