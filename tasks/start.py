"""The first two tasks of every flow: validate the recipe, then make (or reopen) the run folder.

They live here, not beside `load_recipe` and `RunFolder`, so that tasks/recipe.py and tasks/run.py stay
free of Prefect: the training worker imports both and travels to a GPU machine with a handful of wheels.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.runtime import flow_run

from tasks.tasktypes import check_recipe
from tasks.recipe import Recipe, load_recipe
from tasks.run import RunFolder, atomic_write_text, new_run_dir, record_attempt


@task(name="validate-recipe")
def validate_recipe(recipe: str, overrides: dict | None = None) -> Recipe:
    """First task of every flow: a bad recipe (or one its task type cannot run) stops the run before any work."""
    return check_recipe(load_recipe(recipe, overrides))


@task(name="create-run-folder")
def create_run_folder(output_root: str, recipe: Recipe, run_name: str | None = None,
                      resume_from: str | None = None, kind: str = "") -> Path:
    """A fresh, isolated run folder holding the fully resolved recipe (what the trainer will read), or
    an earlier run that did not complete, to resume (training restarts from its last checkpoint and
    completed stages are skipped). Either way the folder records this flow run as an attempt.

    Args:
        run_name: the folder's name; default `<recipe>[-<kind>]-<UTC time>`, made unique when another
            run claimed the same second.

    Raises:
        ValueError: the folder to resume is complete, missing, or was made with another recipe.
        FileExistsError: `run_name` is taken.
    """
    if resume_from:
        if ".." in Path(resume_from).parts:
            raise ValueError(f"resume_from {resume_from!r}: a path with '..' is refused; name the run folder itself")
        run = RunFolder(Path(resume_from).resolve())
        if not run.recipe_json.exists():
            raise ValueError(f"resume_from {run}: not a run folder (no recipe.json)")
        if run.is_complete():
            raise ValueError(f"resume_from {run}: that run completed; start a new one")
        if run.recipe_json.read_text() != recipe.model_dump_json(indent=2):
            raise ValueError(f"resume_from {run}: made with a different recipe; resume with the same one")
        record_attempt(run, flow_run.id, resumed=True)
        return run.root
    name = f"{recipe.name}-{kind}" if kind else recipe.name
    run = RunFolder(new_run_dir(output_root, name, run_name).resolve())
    atomic_write_text(run.recipe_json, recipe.model_dump_json(indent=2))
    record_attempt(run, flow_run.id, resumed=False)
    return run.root
