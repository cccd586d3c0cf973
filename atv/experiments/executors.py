"""Where a grid's cells are computed: in this process, one after the other (the default), or as Ray tasks
across the GPUs of a machine or a cluster.

An executor maps ``measure(cell, shared)`` over cells and yields each cell's measurement as it finishes
(in any order); the driver alone writes them to the result log. ``measure`` runs where the executor
puts it: for Ray it must be picklable and load what it needs (the model, the calibration, the
benchmarks) inside the worker, from paths (see ``cells.CellInputs``), never from the driver's memory.

Ray runs each cell as a task with ``num_gpus`` GPUs (``--gpus-per-cell``; by default 1 when the cluster
has GPUs, else 0) and ``num_cpus`` CPUs, and re-runs a cell whose worker process died (up to
``cell_retries`` times); an exception raised by the cell itself is not retried: it stops the run.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from pruning.errors import ConfigError, ToolkitError
from pruning.options import option

log = logging.getLogger(__name__)

EXECUTORS = ("in-process", "ray")
_NO_RAY = "--executor ray needs Ray: pip install -e '.[ray]' (or pip install ray)"
Measure = Callable[[dict, Any], dict]  # (cell, shared) -> the cell's measurement


@dataclass
class ExecutorOptions:
    """How a grid's missing cells are run (never part of a study's pinned setup: results do not depend on it)."""

    executor: str = option("in-process", "where cells run: one after the other in this process, or as Ray tasks "
                                          "(pip install -e '.[ray]')", choices=EXECUTORS)
    ray_address: str | None = option(None, "join a running Ray cluster ('auto' or HOST:PORT); default: start a "
                                           "local Ray on this machine")
    gpus_per_cell: float | None = option(None, "GPUs per cell task (default: 1 when the Ray cluster has GPUs, "
                                               "else 0)")
    cpus_per_cell: float = option(1.0, "CPUs per cell task (also the task's torch threads)")
    ray_cpus: int | None = option(None, "CPUs of a local Ray (default: all of this machine's)")
    cell_retries: int = option(3, "times a cell whose Ray worker died is re-run")

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        given = [name for name in ("ray_address", "gpus_per_cell", "ray_cpus") if getattr(self, name) is not None]
        if self.executor != "ray" and given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is an option of the Ray executor: add --executor ray")
        if self.gpus_per_cell is not None and self.gpus_per_cell < 0:
            raise ConfigError(f"gpus_per_cell must be >= 0, got {self.gpus_per_cell}")
        if self.cpus_per_cell <= 0 or (self.ray_cpus is not None and self.ray_cpus < 1):
            raise ConfigError(f"cpus_per_cell must be > 0 and ray_cpus >= 1, got {self.cpus_per_cell} and "
                              f"{self.ray_cpus}")
        if self.cell_retries < 0:
            raise ConfigError(f"cell_retries must be >= 0, got {self.cell_retries}")
        if self.ray_address is not None and self.ray_cpus is not None:
            raise ConfigError("--ray-cpus sizes a local Ray; a cluster joined with --ray-address has its own CPUs")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError(_NO_RAY)


class InProcess:
    """Cells one after the other in this process, in the order given."""

    remote = False

    def map(self, measure: Measure, cells: Sequence[dict], shared: Any = None) -> Iterator[dict]:
        for cell in cells:
            yield measure(cell, shared)

    def call(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def close(self) -> None:
        pass


class RayExecutor:
    """Cells as Ray tasks; measurements stream back as tasks finish (``ray.wait``).

    Starts a local Ray (``ray_cpus`` CPUs), joins the cluster at ``ray_address``, or uses the Ray this
    process already initialised; :meth:`close` shuts down only a Ray it started."""

    remote = True

    def __init__(self, options: ExecutorOptions):
        try:
            import ray
        except ImportError:
            raise ConfigError(_NO_RAY) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
            if options.ray_address is not None:
                kwargs["address"] = options.ray_address
            else:
                kwargs["num_cpus"] = options.ray_cpus
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ToolkitError(f"cannot start or join Ray (address {options.ray_address!r}): "
                                   f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
            self._started = True
        resources = ray.cluster_resources()
        gpus = options.gpus_per_cell
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        for name, want in (("GPU", gpus), ("CPU", options.cpus_per_cell)):
            if want > resources.get(name, 0):
                self.close()
                raise ConfigError(f"a cell asks for {want:g} {name}(s) but the Ray cluster has "
                                  f"{resources.get(name, 0):g}: lower --{name.lower()}s-per-cell")
        self.task_options = {"num_gpus": gpus, "num_cpus": options.cpus_per_cell,
                             "max_retries": options.cell_retries, "retry_exceptions": False}
        log.info("Ray: %s; each cell task takes %s", resources, self.task_options)

    def map(self, measure: Measure, cells: Sequence[dict], shared: Any = None) -> Iterator[dict]:
        ray = self._ray
        task = ray.remote(_run).options(**self.task_options)
        shared_ref = ray.put(shared)
        cell_of = {task.remote(measure, cell, shared_ref): cell for cell in cells}
        pending = list(cell_of)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield self._get(done[0], cell_of[done[0]])
        finally:
            for ref in pending:  # the driver stopped early (an error, an interrupt): drop the rest
                ray.cancel(ref, force=True)

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` as one task with a cell's resources (e.g. the dense fidelity reference)."""
        return self._get(self._ray.remote(_run_call).options(**self.task_options).remote(fn))

    def _get(self, ref: Any, cell: dict | None = None) -> Any:
        """The task's result; a toolkit error raised inside it is raised here as itself (one clear line), a
        worker that died more often than the retries allow as a ToolkitError naming the cell."""
        from ray.exceptions import RayError, RayTaskError

        try:
            return self._ray.get(ref)
        except RayTaskError as err:
            if isinstance(err.cause, ToolkitError):
                raise err.cause from None
            raise
        except RayError as err:
            what = "a task" if cell is None else "cell " + "/".join(map(str, cell.values()))
            tries = self.task_options["max_retries"] + 1
            raise ToolkitError(f"{what}: its Ray worker died {tries} time(s) ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else '-'}); finished cells are kept: re-run "
                               "to resume (raise --cell-retries, or look for out-of-memory kills)") from None

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def _run(measure: Measure, cell: dict, shared: Any) -> dict:
    _quiet_worker()
    return measure(cell, shared)


def _run_call(fn: Callable[[], Any]) -> Any:
    _quiet_worker()
    return fn()


def _quiet_worker() -> None:
    """No transformers progress bars from the tasks (Ray forwards every worker's stderr to the driver, which
    shows one bar for the grid)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def make_executor(options: ExecutorOptions | None) -> InProcess | RayExecutor:
    """The executor the options name (in-process when None)."""
    if options is None or options.executor == "in-process":
        return InProcess()
    return RayExecutor(options)
