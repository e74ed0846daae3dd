"""Tracks: several recipes fine-tuned as runs of finetune deployments, each on a work pool whose job template
pins its GPUs (deployments/pools.yaml) — all at once on pools of their own (`parallel`, the "2+2" layout),
or one after the other on the pool of every GPU (`sequential`).

A track is one finetune flow run of one recipe; its run folder sits inside the tracks folder, so the
worker that runs it and this orchestrator must share that storage (one host, or a shared mount).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import task
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger

from tasks.recipe import StrictModel, load_recipe
from tasks.run import RunFolder, TracksFolder, read_json
from tasks.tasktypes import check_recipe

Layout = Literal["parallel", "sequential"]
TrackFlow = Literal["finetune", "train"]   # flows/finetune.py (every stage) or flows/train.py (training only)


class Track(StrictModel):
    """One recipe's fine-tune, and where it runs."""

    recipe: str
    run_name: str        # its run folder inside the tracks folder
    deployment: str      # "<flow>/<pool>", e.g. "finetune/gpu-a"
    work_pool: str       # the deployment's pool on the server (its job template gives the run its GPUs)


def track_names(recipes: list[str]) -> list[str]:
    """A run folder name per recipe: its stem, numbered when two tracks use the same recipe."""
    names: list[str] = []
    for recipe in recipes:
        stem, n = Path(recipe).stem, 1
        name = stem
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def deployment_pool(name: str) -> str:
    """The work pool of a deployment on the server.

    Raises:
        ValueError: no such deployment (with how to create it).
    """
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).work_pool_name
        except ObjectNotFound:
            raise ValueError(f"deployment {name!r} not found on the Prefect server: run `slipway deploy` "
                             "(python -m deployments.up) first") from None


@task(name="plan-tracks")
def plan_tracks(layout: Layout, recipes: list[str], overrides: dict, track_flow: TrackFlow, pools: list[str],
                all_gpus_pool: str) -> list[Track]:
    """Validate every recipe (with the overrides) and give each track its deployment `<track_flow>/<pool>`:
    in `parallel`, the i-th track runs on the i-th pool (round robin when there are more tracks than pools:
    those wait for their pool); in `sequential`, every track runs on `all_gpus_pool`.

    Raises:
        RecipeError: a recipe does not validate.
        ValueError: no recipes, no pools, or a deployment the server does not have.
    """
    if not recipes:
        raise ValueError("tracks: no recipes given")
    if layout == "parallel" and not pools:
        raise ValueError("tracks: layout 'parallel' needs at least one pool")
    for recipe in recipes:
        check_recipe(load_recipe(recipe, overrides))
    targets = ([f"{track_flow}/{pools[i % len(pools)]}" for i in range(len(recipes))] if layout == "parallel"
               else [f"{track_flow}/{all_gpus_pool}"] * len(recipes))
    found = {name: deployment_pool(name) for name in set(targets)}
    return [Track(recipe=recipe, run_name=name, deployment=target, work_pool=found[target])
            for recipe, name, target in zip(recipes, track_names(recipes), targets)]


@task(name="create-tracks-folder")
def create_tracks_folder(output_root: str, name: str) -> Path:
    """A new, empty folder for one tracks run (never an existing one: two runs must not share tracks)."""
    folder = TracksFolder(Path(output_root).resolve() / name)
    folder.root.mkdir(parents=True, exist_ok=False)
    return folder.root


def run_record(run_dir: Path) -> dict:
    """What a track's finetune run folder says about its training: the devices it saw, its training stats,
    its recipe's batch settings and its gate verdicts (from COMPLETE, written with the report)."""
    run = RunFolder(run_dir)
    recipe = read_json(run.recipe_json, missing_ok=True) or {}
    complete = read_json(run.complete_marker, missing_ok=True)
    return {"run_dir": str(run), "complete": complete is not None,
            "devices": read_json(run.devices, missing_ok=True),
            "training": read_json(run.training_stats, missing_ok=True),
            "batch": {k: recipe.get("training", {}).get(k) for k in ("batch_size", "grad_accum")},
            "gates": (complete or {}).get("gates", [])}


# No retries: a track is a training run; a failed one is reported, not repeated.
@task(name="run-track", task_run_name="track-{track.run_name}")
def run_track(tracks_dir: Path, track: Track, overrides: dict) -> dict:
    """Run one track as a flow run of its deployment and wait for it; returns its state, its times on the
    server (start/end of the flow run) and what its run folder records. A failed run is a result here
    (the report shows it), not an exception."""
    logger = get_run_logger()
    run_dir = TracksFolder(tracks_dir).track_run(track.run_name)
    params = {"recipe": track.recipe, "overrides": overrides, "output_root": str(tracks_dir),
              "run_name": track.run_name}
    logger.info("track %s: %s on pool %s", track.run_name, track.deployment, track.work_pool)
    flow_run = run_deployment(name=track.deployment, parameters=params, timeout=None, as_subflow=True,
                              flow_run_name=f"track-{track.run_name}")
    state = flow_run.state
    logger.info("track %s: %s (%s)", track.run_name, state.name if state else None, flow_run.name)
    return {**track.model_dump(), "flow_run": flow_run.name, "flow_run_id": str(flow_run.id),
            "state": state.name if state else "unknown", "completed": bool(state and state.is_completed()),
            "message": state.message if state else None,
            "start": flow_run.start_time.timestamp() if flow_run.start_time else None,
            "end": flow_run.end_time.timestamp() if flow_run.end_time else None,
            **run_record(run_dir)}


class TracksFailed(RuntimeError):
    """A track stopped before its report; the tracks report was still written."""


@task(name="require-tracks-finished")
def require_tracks_finished(results: list[dict]) -> None:
    """Last task: fail the tracks run when a track stopped before its report (after the tracks report was
    written). A track whose gates failed has finished: its gates are a verdict the report shows.

    Raises:
        TracksFailed: naming each such track, its state and its message.
    """
    stopped = [r for r in results if not r["complete"]]
    if stopped:
        raise TracksFailed("; ".join(f"track {r['run_name']} ({r['deployment']}) ended {r['state']} before its "
                                     f"report: {r['message']}" for r in stopped))
