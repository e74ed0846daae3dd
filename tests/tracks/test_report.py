"""The tracks report's figures from what track runs record (their folders' devices, training stats, gates)."""

from tasks.tracks.dispatch import track_names
from tasks.tracks.report import render_tracks_report, summarize, training_tokens


def _result(name, start, end, pool, devices, *, world_size=1, seconds=10.0, gates_pass=True, complete=True):
    history = [{"loss": 2.0, "num_tokens": 500.0, "step": 5}, {"loss": 1.0, "num_tokens": 1000.0, "step": 10}]
    return {"run_name": name, "recipe": name, "deployment": f"finetune/{pool}", "work_pool": pool,
            "state": "Completed" if gates_pass else "Failed", "flow_run": f"track-{name}", "complete": complete,
            "start": start, "end": end, "run_dir": f"/runs/x/{name}",
            "devices": {"cuda_visible_devices": devices, "cuda_device_count": len(devices.split(",")),
                        "gpu_names": ["H200"] * len(devices.split(","))},
            "training": {"steps": 10, "seconds": seconds, "world_size": world_size, "device": "cuda",
                         "history": history, "tokens_seen": None, "mask": {"rows": 20, "tokens": 4000}},
            "batch": {"batch_size": 4, "grad_accum": 1},
            "gates": [{"name": "loss-converged", "passed": gates_pass, "threshold": "t", "observed": "o"}]}


def test_tokens_come_from_the_worker_then_the_logged_count_then_an_estimate():
    assert training_tokens({"tokens_seen": 777}, {}) == (777, False)
    logged = {"steps": 10, "history": [{"num_tokens": 400.0, "step": 5}]}
    assert training_tokens(logged, {}) == (800, True)                       # scaled from step 5 to 10
    assert training_tokens({**logged, "steps": 5}, {}) == (400, False)
    masked = {"steps": 3, "world_size": 2, "mask": {"rows": 10, "tokens": 1000}, "history": []}
    assert training_tokens(masked, {"batch_size": 4, "grad_accum": 2}) == (4800, True)   # 3 × 16 rows × 100
    assert training_tokens({"steps": 3, "history": []}, {}) == (None, False)


def test_parallel_wall_time_is_the_overlap_and_tokens_per_gpu_divide_by_processes():
    summary = summarize("parallel", [_result("structured", 100.0, 160.0, "gpu-a", "0,1", world_size=2),
                                     _result("toolcall", 102.0, 170.0, "gpu-b", "2,3", world_size=2)])
    assert summary["wall_seconds"] == 70.0 and summary["sum_run_seconds"] == 128.0
    first = summary["tracks"][0]
    assert (first["work_pool"], first["cuda_visible_devices"], first["gpus_seen"]) == ("gpu-a", "0,1", 2)
    assert first["tokens_per_second"] == 100.0 and first["tokens_per_second_per_process"] == 50.0
    assert summary["all_finished"] and summary["all_gates_passed"]


def test_the_report_shows_each_track_its_gates_and_the_other_layout_beside_it():
    sequential = summarize("sequential", [_result("structured", 0.0, 40.0, "gpu-all", "0,1,2,3", world_size=4),
                                          _result("toolcall", 41.0, 90.0, "gpu-all", "0,1,2,3", world_size=4,
                                                  gates_pass=False)])
    parallel = summarize("parallel", [_result("structured", 0.0, 60.0, "gpu-a", "0,1", world_size=2),
                                      _result("toolcall", 0.0, 66.0, "gpu-b", "2,3", world_size=2)])
    markdown = render_tracks_report("tracks-seq", sequential, parallel)
    assert "| toolcall | gpu-all | `0,1,2,3` | 4 | 4 (cuda) | Failed |" in markdown
    assert "loss-converged **FAIL**" in markdown and not sequential["all_gates_passed"]
    assert "## Layouts compared" in markdown and "sequential / parallel wall time: **1.36×**" in markdown


def test_two_tracks_of_one_recipe_get_their_own_folders():
    assert track_names(["fledgling-structured", "recipes/fledgling-structured.yaml", "x"]) == [
        "fledgling-structured", "fledgling-structured-2", "x"]
