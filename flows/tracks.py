"""`tracks`: fine-tune several recipes (the Fledgling structured and tool-call tracks by default) either all
at once, each as a finetune deployment run on a work pool of its own GPUs, or one after the other on the
pool of every GPU; then one report compares wall time, training tokens/s per GPU and each track's gates.

Run it (a Prefect server with the pools and deployments of `slipway deploy --gpus N`, one worker per pool):
    prefect worker start --pool gpu-a & prefect worker start --pool gpu-b & prefect worker start --pool gpu-all &
    slipway tracks --layout parallel                  # 2+2 on a 4-GPU host (1+1 on a 2-GPU host)
    slipway tracks --layout sequential --compare-with runs/tracks-parallel-<time>
    prefect deployment run tracks/fledgling -p layout=sequential

A track is a run of the deployment `<track_flow>/<pool>`: `finetune/gpu-a` (the whole pipeline) or
`train/gpu-a` (training only, flows/train.py). Which GPUs it gets is its pool's business
(deployments/pools.yaml: CUDA_VISIBLE_DEVICES in each pool's base job template), and training starts one
process per GPU its run sees, so this flow names pools, never devices. A track whose gates fail has still
finished (its report says so); the tracks run fails only when a track stopped before its report.
Stages: plan (recipes validated, deployments found) → tracks folder → the tracks (at once, or in turn) →
report → every track finished. The flow only wires tasks.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow

from tasks.recipe import REPO_ROOT
from tasks.tracks.dispatch import (Layout, TrackFlow, create_tracks_folder, plan_tracks, require_tracks_finished,
                                   run_track)
from tasks.tracks.report import write_tracks_report

FLEDGLING_TRACKS = ["fledgling-structured", "fledgling-toolcall"]
PARALLEL_POOLS = ["gpu-a", "gpu-b"]
ALL_GPUS_POOL = "gpu-all"


@flow(name="tracks", log_prints=True)
def tracks(layout: Layout = "parallel", recipes: list[str] | None = None, overrides: dict | None = None,
           track_flow: TrackFlow = "finetune", pools: list[str] | None = None, all_gpus_pool: str = ALL_GPUS_POOL,
           output_root: str = str(REPO_ROOT / "runs"), run_name: str | None = None,
           compare_with: str | None = None) -> str:
    """Fine-tune every recipe as a deployment run, in the given layout; returns the tracks folder.

    Args:
        layout: 'parallel': every track at once, the i-th on the i-th of `pools`; 'sequential': one after
            the other on `all_gpus_pool`.
        recipes: recipe names or YAML paths (default: the Fledgling structured and tool-call tracks).
        overrides: dotted recipe fields for every track, e.g. {"training.max_steps": 50}.
        track_flow: 'finetune' (the whole pipeline, gates included) or 'train' (training and its loss gate):
            a track runs the deployment `<track_flow>/<pool>`.
        pools: the pools of the parallel layout, one per track (default gpu-a, gpu-b; round robin when
            there are more tracks).
        all_gpus_pool: the pool of the sequential layout (default gpu-all).
        output_root: where the tracks folder is created; the tracks' run folders go inside it (storage the
            GPU workers see too).
        run_name: the tracks folder's name (default: tracks-<layout>-<UTC timestamp>).
        compare_with: the tracks folder of a run in the other layout, shown beside this one in the report.
    """
    overrides = overrides or {}
    plan = plan_tracks(layout, recipes or FLEDGLING_TRACKS, overrides, track_flow, pools or PARALLEL_POOLS,
                       all_gpus_pool)
    name = run_name or f"tracks-{layout}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    folder = create_tracks_folder(output_root, name)
    if layout == "parallel":   # every track at once; each waits only for its own pool
        results = [future.result() for future in [run_track.submit(folder, track, overrides) for track in plan]]
    else:                      # in turn, each on every GPU
        results = [run_track(folder, track, overrides) for track in plan]
    write_tracks_report(folder, layout, results, compare_with)
    require_tracks_finished(results)
    return str(folder)
