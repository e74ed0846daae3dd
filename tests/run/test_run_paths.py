"""Only tasks/run.py knows where an artifact lives inside a run folder: no other module joins a run
folder's sub-path by string (the layout can then change in one place, and a reader finds every artifact
by name in RunFolder)."""

import re

from conftest import REPO

# `<anything> / "metrics"`, `run_dir / "COMPLETE"`, `run / f"gguf..."`: a path join onto one of the run
# folder's own names. Cache folders and the repo's own data/ are joined through named constants instead.
RUN_NAMES = r"(data|checkpoints|lora|merged|gguf|metrics|deploy|release|recipe\.json|report\.md|COMPLETE)"
JOIN = re.compile(r"""\b(run_dir|run|run_path|out_dir|rd)\)?\s*/\s*f?["']""" + r"|/\s*f?[\"']" + RUN_NAMES + r"""\b[^"']*["']""")


def offending_lines() -> list[str]:
    hits = []
    for folder in ("tasks", "flows", "blocks", "deployments"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "tasks" / "run.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if JOIN.search(line.split("#")[0]):
                    hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    return hits


def test_no_module_outside_run_py_joins_a_run_folder_path_by_string():
    hits = offending_lines()
    assert not hits, "join run-folder paths through tasks.run.RunFolder:\n" + "\n".join(hits)


def test_the_check_catches_a_join(tmp_path):
    line = 'report = run_dir / "metrics" / "eval.json"'
    assert JOIN.search(line) and JOIN.search('x = folder / "gguf" / name') and not JOIN.search("run.gguf('f16')")
