"""`atv probe --executor ray`: a local Ray with 2 CPUs gives the same results log and table as the in-process run,
and a cell whose worker died is re-run. Skipped when Ray is not installed (.ci/run installs it)."""

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny_studies import study_files

from atv.experiments.executors import ExecutorOptions, RayExecutor
from atv.experiments.probe_study import ProbeJob, StudyConfig, run_probe_job
from atv.experiments.records import RESULTS, read_records
from pruning.errors import ConfigError, ToolkitError

# The test's local Ray talks over the loopback interface only (read by Ray when it is imported: a one-node Ray
# then takes 127.0.0.1 as its node address instead of the machine's network address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

VICTIM = {"pathway": "text", "pool": "visual", "sparsity": 0.5}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made = study_files(tmp_path_factory.mktemp("ray"))
    return made.tmp, made.model, made.calib, made.images, (made.bench, made.fidelity)


def _job(files, out, run=None):
    tmp, model_dir, calib, images, benches = files
    return ProbeJob(model=str(model_dir), calib=calib, images=images, benchmarks=benches, out=tmp / out, nsamples=3,
                    config=StudyConfig(sparsities=(0.5,), pools=("text", "visual"), batch_size=2),
                    run=run or ExecutorOptions())


@pytest.fixture(scope="module")
def in_process(files):
    """The reference run, in this process with one torch thread: a Ray task gets --cpus-per-cell threads (1), and
    the KL metric's last digits depend on the thread count (the scores do not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_probe_job(_job(files, "in-process"), progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the module (the executors use it and leave it running)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    yield
    ray.shutdown()


def _same_results(a: Path, b: Path, table: str = "probe_table.md") -> None:
    """Same cell set and, per cell, the same scores, metrics and retention (times and order may differ)."""
    def by_cell(path):
        records = read_records(path / RESULTS)
        keyed = {json.dumps(r["cell"], sort_keys=True): r for r in records}
        assert len(keyed) == len(records), "a cell was recorded twice"
        return keyed

    left, right = by_cell(a), by_cell(b)
    assert sorted(left) == sorted(right)
    for key, record in left.items():
        for field in ("scores", "metrics", "prune_sparsity", "retention", "mean_retention"):
            if field == "prune_sparsity":
                assert (record["prune"] or {}).get("mean_sparsity") == (right[key]["prune"] or {}).get("mean_sparsity")
            else:
                assert record[field] == right[key][field], (key, field)
    assert (a / table).read_text() == (b / table).read_text()
    setups = [json.loads((folder / "study.json").read_text()) for folder in (a, b)]
    if setups[0]["calib"] != setups[1]["calib"]:  # two demo folders: their paths differ, nothing else may
        setups = [{k: v for k, v in s.items() if k not in ("model", "calib", "images", "inputs")} for s in setups]
    assert setups[0] == setups[1]


def test_ray_run_gives_the_in_process_results_and_table(files, in_process, local_ray):
    result = run_probe_job(_job(files, "ray", ExecutorOptions(executor="ray")), progress=False)
    assert result.computed == 5 and len(result.records) == 5 and in_process.computed == 5
    _same_results(in_process.out_dir, result.out_dir)
    again = run_probe_job(_job(files, "ray", ExecutorOptions(executor="ray")), progress=False)
    assert again.computed == 0  # resumed: nothing recomputed
    assert ray.is_initialized()  # a Ray the executor did not start is left running


class KillOnce:
    """Runs a cell, then, on the first attempt at VICTIM only, kills its worker process before the result is
    returned (os._exit: the task's worker dies as on an OOM kill or a lost node); ``marker`` records that."""

    def __init__(self, measure, marker: str):
        self.measure, self.marker = measure, marker

    def __call__(self, cell, shared):
        measured = self.measure(cell, shared)
        if cell == VICTIM and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return measured


class KillingRay(RayExecutor):
    def __init__(self, options, marker):
        super().__init__(options)
        self.marker = marker

    def map(self, measure, cells, shared=None):
        return super().map(KillOnce(measure, self.marker), cells, shared)


def test_a_cell_whose_worker_died_is_rerun_and_the_table_is_the_same(files, in_process, local_ray, tmp_path):
    marker = tmp_path / "killed"
    executor = KillingRay(ExecutorOptions(executor="ray", cell_retries=2), str(marker))
    result = run_probe_job(_job(files, "ray-killed"), progress=False, executor=executor)
    assert marker.is_file() and int(marker.read_text()) > 0  # the first attempt at VICTIM died...
    assert result.computed == 5                               # ...and was re-run
    _same_results(in_process.out_dir, result.out_dir)


def test_without_retries_a_dead_worker_fails_the_run(files, local_ray, tmp_path):
    marker = tmp_path / "killed"
    executor = KillingRay(ExecutorOptions(executor="ray", cell_retries=0), str(marker))
    with pytest.raises(ToolkitError, match=r"cell text/visual/0.5: its Ray worker died 1 time\(s\)"):
        run_probe_job(_job(files, "ray-no-retry"), progress=False, executor=executor)
    assert marker.is_file()
    records = read_records(files[0] / "ray-no-retry" / RESULTS)
    assert VICTIM not in [r["cell"] for r in records]  # what finished is kept; a rerun computes the rest


def test_cells_asking_for_more_than_the_cluster_has_are_refused(local_ray):
    with pytest.raises(ConfigError, match="asks for 1 GPU.*has 0"):
        RayExecutor(ExecutorOptions(executor="ray", gpus_per_cell=1))
    with pytest.raises(ConfigError, match="asks for 4 CPU.*has 2"):
        RayExecutor(ExecutorOptions(executor="ray", cpus_per_cell=4))


@pytest.mark.parametrize("kwargs, match", [
    ({"ray_address": "auto"}, "--ray-address is an option of the Ray executor"),
    ({"executor": "dask"}, "executor must be one of"),
    ({"executor": "ray", "gpus_per_cell": -1}, "gpus_per_cell must be >= 0"),
    ({"executor": "ray", "ray_address": "auto", "ray_cpus": 2}, "--ray-cpus sizes a local Ray"),
])
def test_bad_executor_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExecutorOptions(**kwargs)


def test_demo_on_ray_gives_the_in_process_probe_and_method_results(files, local_ray, tmp_path, monkeypatch):
    from atv.experiments.demo import DemoConfig, run_demo

    monkeypatch.setattr("atv.default_model.build_default_model", lambda *a, **k: files[1])
    small = {"quick": True, "nsamples": 3, "n_eval": 2, "calib_batch_size": 2, "methods": ("atv", "magnitude")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task's (see in_process)
    try:
        here = run_demo(DemoConfig(out=tmp_path / "here", **small), progress=False)
    finally:
        torch.set_num_threads(threads)
    there = run_demo(DemoConfig(out=tmp_path / "ray", run=ExecutorOptions(executor="ray"), **small), progress=False)
    _same_results(tmp_path / "here" / "probe", tmp_path / "ray" / "probe")
    _same_results(tmp_path / "here" / "methods", tmp_path / "ray" / "methods", table="method_scores.md")
    assert here.method_table == there.method_table and here.probe_table == there.probe_table
