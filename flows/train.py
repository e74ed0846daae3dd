"""`train`: the training half of `finetune` — recipe, run folder, devices, base model, splits, LoRA training,
the loss gate and a short report; no export, serving or evaluation.

For measuring training where the rest would only add the same time to every run (the tracks flow's
throughput comparison on GPU pools), and for GPU hosts that lack llama.cpp:
    prefect deployment run train/gpu-a -p recipe=fledgling-structured
    slipway tracks --flow train --layout parallel

The run folder is a finetune run folder up to `lora/` and `metrics/training-stats.json`; its COMPLETE marker
holds the gate verdicts as finetune's does. The flow only wires tasks.
"""

from __future__ import annotations

from prefect import flow

from tasks.data.prepare import prepare_splits, write_splits
from tasks.eval.gates import enforce_gates
from tasks.models.bootstrap import bootstrap_base_model
from tasks.recipe import REPO_ROOT
from tasks.start import create_run_folder, validate_recipe
from tasks.train.devices import record_devices
from tasks.train.launch import train_adapter
from tasks.train.report import check_training_gates, write_training_report


@flow(name="train", log_prints=True)
def train(recipe: str = "fledgling-structured", overrides: dict | None = None,
          output_root: str = str(REPO_ROOT / "runs"), run_name: str | None = None) -> str:
    """Train one recipe's adapter and judge its loss; returns the run folder.

    Args:
        recipe: a recipe name in recipes/ or a YAML path.
        overrides: dotted recipe fields to override, e.g. {"training.max_steps": 5}.
        output_root: where run folders are created (each run gets its own).
        run_name: the run folder's name (default: <recipe>-<UTC timestamp>).
    """
    cfg = validate_recipe(recipe, overrides or {})
    run_dir = create_run_folder(output_root, cfg, run_name)
    record_devices(run_dir)   # the GPUs this run's work pool gave it
    base_dir = bootstrap_base_model(cfg.model)
    splits = write_splits(run_dir, prepare_splits(cfg.data, cfg.model.system_prompt, cfg.task))
    training = train_adapter(cfg, run_dir, base_dir, wait_for=[splits])
    gates = check_training_gates(cfg, training)
    write_training_report(cfg, run_dir, gates, training)
    enforce_gates(gates)
    return str(run_dir)
