"""lmms-eval bridge: score an in-memory LVLM (plain, pruned, or an MoT probe) on lmms-eval tasks.

A probe model exists only in memory, so the bridge wraps a model *object* with its processor::

    from lmms_eval.evaluator import simple_evaluate
    from evaluation.lmms_bridge import ATVModel
    results = simple_evaluate(model=ATVModel(model=model, processor=processor), tasks=["pope"])

or, from the command line, a model folder (optionally re-pruned as a probe cell, see
:mod:`atv.experiments.eval_job`)::

    lmms-eval --model atv --model_args pretrained=DIR,probe_from=runs/probe/results.jsonl:text/visual/0.5 --tasks pope

Prompts are the toolkit harness's (:func:`evaluation.model_io.build_prompt`: one user turn, the image
first, then the task's question, and the generation prompt) and generation is the harness's greedy
call, batched the same way (windows of ``batch_size`` requests in order, split by modality), so a
harness benchmark and an lmms-eval task over the same items give the same answers.

* ``generate_until``: greedy, at most the task's ``max_new_tokens``, cut at the first of the task's
  stop sequences (``until``; generation also halts once every row has produced one), then stripped.
* ``loglikelihood``: ``-log p(continuation | prompt)`` summed over the continuation's tokens, and
  whether it is the greedy continuation. The sign is lmms-eval 0.7's: its ``multiple_choice`` scoring
  takes the ``argmin`` (its built-in models return losses), so the chosen option is the harness's.

The model is registered for ``lmms-eval --model atv`` through the entry-point group
``lmms_eval.models`` (see :func:`manifest`); :func:`register` does the same at run time.

Only this module (and code that calls it) needs lmms-eval; importing it without lmms-eval raises
:class:`LmmsEvalMissing`, which says how to install the extra.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from pruning.data import open_image
from pruning.errors import ConfigError, ToolkitError

from . import metrics, processes
from .benchmarks import CHOICE, OPEN, Benchmark, load_benchmark
from .install import INSTALL_HINT
from .lmms_runs import BRIDGE, LmmsRun, LmmsScore, evaluate_tasks, format_model_args, task_manager
from .model_io import build_prompt, common_prefix, encode, forward_rows, greedy_generate, inference, real_ids
from .reports import BenchmarkResult

log = logging.getLogger(__name__)

MODEL_NAME = BRIDGE  # lmms-eval --model atv
DEFAULT_MAX_NEW_TOKENS = 128  # when a task sets no max_new_tokens


# Re-creates a probe cell from a model folder for ``probe_from=``. The study code that knows how lives in a
# higher layer (atv.experiments.eval_job), which registers it here: this module never imports its users.
_cell_loader: Callable[..., tuple[nn.Module, Any]] | None = None


def set_cell_loader(loader: Callable[..., tuple[nn.Module, Any]]) -> None:
    """Register ``loader(model_dir, probe_from, *, calib, images, dtype, device) -> (model, processor)``."""
    global _cell_loader
    _cell_loader = loader


class LmmsEvalMissing(ToolkitError, ImportError):
    """lmms-eval is not installed (or its core import path fails)."""


try:
    from lmms_eval.api import instance as _instance
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as err:  # the message names what is missing, and how to get it
    raise LmmsEvalMissing(f"the lmms-eval bridge needs lmms-eval ({err}); {INSTALL_HINT}") from err


def _loglikelihood_output(value: float, greedy: bool) -> Any:
    """One loglikelihood answer as the evaluator will keep it. lmms-eval 0.7.3 passes every response through
    ``unwrap_generation_output``, which turns a ``(float, bool)`` tuple into its string (and multiple_choice
    scoring then fails); a ``GenerationResult`` carrying the tuple comes through intact."""
    pair = (value, greedy)
    unwrap = getattr(_instance, "unwrap_generation_output", None)
    if unwrap is None or unwrap(pair)[0] == pair:
        return pair
    return _instance.GenerationResult(text=pair)


def _name(device: torch.device | None) -> str | None:
    return None if device is None else str(device)


# -- prompts and stop sequences (pure) ---------------------------------------------------------------


bridge_prompt = build_prompt  # an lmms-eval context and its image count -> the harness prompt


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence (empty ones ignored), stripped.

    >>> cut_at_stop(" red\\nQ: blue", ["\\n", "Q:"])
    'red'
    """
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut].strip()


# -- requests ----------------------------------------------------------------------------------------


@dataclass
class _Request:
    """One lmms-eval request, resolved: its context, images and (generation) settings or continuation."""

    index: int  # position in the request list (answers go back in this order)
    context: str
    images: list[Image.Image]
    until: tuple[str, ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    continuation: str = ""

    @property
    def group(self) -> tuple:
        """Requests batched together share modality and generation settings."""
        return bool(self.images), self.until, self.max_new_tokens


def _images(visuals: Any, where: str) -> list[Image.Image]:
    """A task's doc_to_visual output -> RGB images (as the harness opens them); only images are supported."""
    if visuals is None:
        return []
    flat = []
    for visual in (visuals if isinstance(visuals, (list, tuple)) else [visuals]):
        if visual is None:
            continue
        if not isinstance(visual, Image.Image):
            raise ConfigError(f"{where}: the atv bridge takes images only, got a {type(visual).__name__} visual "
                              f"({str(visual)[:80]!r}); video and audio tasks need another lmms-eval model")
        flat.append(visual.convert("RGB"))
    return flat


def _windows(requests: list[_Request], batch_size: int) -> Iterable[list[_Request]]:
    """The harness's batching: ``batch_size`` requests in order, each window split by group (first seen first)."""
    for start in range(0, len(requests), batch_size):
        groups: dict[tuple, list[_Request]] = {}
        for request in requests[start:start + batch_size]:
            groups.setdefault(request.group, []).append(request)
        yield from groups.values()


# -- the lmms-eval model -----------------------------------------------------------------------------


def _in_memory(model: nn.Module, processor, probe_from: str | None) -> tuple[nn.Module, Any]:
    if processor is None:
        raise ConfigError("model= needs its processor= (with a chat template)")
    if probe_from is not None:
        raise ConfigError("probe_from= re-creates a probe from a model folder; with model= attach and prune "
                          "the probe yourself (mot_probe.attach_probe_)")
    return model, processor


def _from_folder(folder: Path, probe_from: str | None, calib: str | None, images: str | None, dtype: str,
                 device: str | None) -> tuple[nn.Module, Any]:
    """A model folder, or (``probe_from``) a probe cell re-created from it by the registered loader."""
    if probe_from is not None:
        if _cell_loader is None:
            raise ConfigError("probe_from= needs the probe-cell loader of atv.experiments.eval_job (registered "
                              "by the `lmms-eval --model atv` entry point, or by importing that module)")
        return _cell_loader(folder, probe_from, calib=calib, images=images, dtype=dtype, device=device)
    if calib is not None or images is not None:
        raise ConfigError("calib= and images= only re-create a probe cell: give probe_from= too")
    from pruning.io import load_model

    return load_model(folder, dtype, device)


class ATVModel(lmms):
    """An lmms-eval model around an in-memory HF LVLM and its processor (plain, pruned, or probed).

    Either ``model`` + ``processor`` (Python), or ``pretrained`` (a model folder, as
    ``--model_args pretrained=DIR`` gives it) with optional ``probe_from`` (``RESULTS:pathway/pool/sparsity``,
    see :class:`atv.experiments.eval_job.ProbeCell`), ``calib``/``images`` overrides, ``dtype`` and ``device``.
    ``batch_size`` requests per forward; ``max_new_tokens`` when a task sets none.

    Rank-aware, as lmms-eval's own models: under ``torchrun`` or ``accelerate launch`` with several
    processes each process holds the model (a folder loads on the process's own device unless ``device``
    is given), lmms-eval hands it its share of the docs and gathers the outputs on process 0.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, model: nn.Module | None = None, processor=None, *,
                 probe_from: str | None = None, calib: str | None = None, images: str | None = None,
                 batch_size: int | str = 8, max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
                 dtype: str = "auto", device: str | None = None, max_batch_size: Any = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown model_args for --model {MODEL_NAME}: {sorted(unknown)}; accepted: pretrained, "
                              "probe_from, calib, images, batch_size, max_new_tokens, dtype, device")
        try:
            self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        except ValueError:
            raise ConfigError(f"batch_size and max_new_tokens must be integers, got {batch_size!r} and "
                              f"{max_new_tokens!r} ('auto' is not supported)") from None
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"batch_size and max_new_tokens must be >= 1, got {self.batch_size} and "
                              f"{self.max_new_tokens}")
        if (model is None) == (pretrained is None):
            raise ConfigError(f"give either model= and processor= (in memory) or pretrained=DIR, got "
                              f"model={type(model).__name__ if model is not None else None}, pretrained={pretrained!r}")
        if model is not None:
            self.model, self.processor = _in_memory(model, processor, probe_from)
        else:  # several processes: each loads on its own device unless told
            device = device if device is not None else _name(processes.process_device())
            self.model, self.processor = _from_folder(Path(pretrained), probe_from, calib, images, dtype, device)
        if getattr(self.processor, "chat_template", None) is None:
            raise ConfigError(f"the processor {type(self.processor).__name__} has no chat template; the bridge "
                              "builds the harness's chat prompt (set processor.chat_template)")
        self._warned_sampling = False
        self._device = next(self.model.parameters()).device
        self.accelerator = processes.accelerator()  # lmms-eval gathers through it
        if self.accelerator.num_processes > 1:
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        """Where the model's (first) weights are: lmms-eval places its rank counts there."""
        return self._device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ATVModel":
        """``--model_args`` plus the evaluator's own settings (``--batch_size``, ``--device``); a setting
        given in ``--model_args`` wins (lmms-eval would otherwise pass it twice)."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- plumbing ---------------------------------------------------------------------------------
    def _log_share(self, kind: str, requests: list) -> None:
        log.info("process %d of %d: %d %s requests", self.rank, self.world_size, len(requests), kind)

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _resolve(self, index: int, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> _Request:
        where = f"task {task!r} doc {doc_id}"
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        images = _images(visuals, where)
        token = getattr(self.processor, "image_token", None)
        if token and token in context:  # the prompt places the images itself
            log.debug("%s: removing %r from the context", where, token)
            context = context.replace(token, "").strip()
        return _Request(index, context, images)

    def _settings(self, request: _Request, gen_kwargs: dict[str, Any]) -> _Request:
        until = gen_kwargs.get("until") or ()
        if isinstance(until, str):
            until = (until,)
        request.until = tuple(until)
        request.max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0 or \
            int(gen_kwargs.get("num_beams") or 1) > 1
        if sampling and not self._warned_sampling:
            log.warning("the atv bridge decodes greedily; ignoring do_sample/temperature/num_beams in %s", gen_kwargs)
            self._warned_sampling = True
        return request

    # -- lmms-eval API ----------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in request order (see the module docstring)."""
        self._log_share("generate_until", requests)
        resolved = []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            resolved.append(self._settings(self._resolve(i, context, doc_to_visual, doc_id, task, split),
                                           dict(gen_kwargs or {})))
        answers: list[str] = [""] * len(resolved)
        with inference(self.model):
            for group in _windows(resolved, self.batch_size):
                for request, text in zip(group, self._generate(group)):
                    answers[request.index] = text
        return answers

    def _generate(self, group: list[_Request]) -> list[str]:
        """The harness's generate call (left-padded, greedy, pad id), stopped and cut at ``until``."""
        prompts = [build_prompt(self.processor, r.context, len(r.images)) for r in group]
        images = [image for r in group for image in r.images] or None
        until = group[0].until
        texts = greedy_generate(self.model, self.processor, prompts, images, group[0].max_new_tokens, until)
        return [cut_at_stop(text, until) for text in texts]

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """Per request (-log p(continuation | prompt), continuation is greedy), in request order (each pair
        wrapped so that the installed lmms-eval keeps it, see :func:`_loglikelihood_output`)."""
        self._log_share("loglikelihood", requests)
        resolved = []
        for i, request in enumerate(requests):
            context, continuation, doc_to_visual, doc_id, task, split = request.args[:6]
            resolved_request = self._resolve(i, context, doc_to_visual, doc_id, task, split)
            if callable(continuation):
                continuation = continuation(self._doc(task, split, doc_id))
            if not isinstance(continuation, str) or not continuation:
                raise ConfigError(f"task {task!r} doc {doc_id}: the continuation must be a non-empty string, got "
                                  f"{continuation!r}")
            resolved_request.continuation = continuation
            resolved.append(resolved_request)
        scores: list[Any] = [None] * len(resolved)
        with inference(self.model):
            for group in _windows(resolved, self.batch_size):
                for request, (value, greedy) in zip(group, self._continuation_scores(group)):
                    scores[request.index] = _loglikelihood_output(value, greedy)
        return scores

    def _continuation_scores(self, group: list[_Request]) -> list[tuple[float, bool]]:
        """As the harness scores an option: the continuation is what follows the longest common prefix of
        the tokenised prompt and prompt + continuation; its summed log-prob from one forward."""
        prompts = [build_prompt(self.processor, r.context, len(r.images)) for r in group]
        images = [image for r in group for image in r.images] or None
        prompt_ids = real_ids(encode(self.processor, prompts, images, "right"))
        fulls = [prompt + r.continuation for prompt, r in zip(prompts, group)]
        rows = forward_rows(self.model, encode(self.processor, fulls, images, "right"))
        scores = []
        for request, prompt, (ids, logits) in zip(group, prompt_ids, rows):
            start = common_prefix(prompt, ids.tolist())
            if not 1 <= start < len(ids):
                raise ConfigError(f"continuation {request.continuation!r} adds no token to the prompt "
                                  f"({len(prompt)} prompt tokens, {len(ids)} with it)")
            logprob = metrics.continuation_logprob(logits, ids, start)
            greedy = bool((logits[start - 1:-1].argmax(-1).cpu() == ids[start:].cpu()).all())
            scores.append((-logprob, greedy))
        return scores

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"--model {MODEL_NAME} answers single-turn tasks only (generate_until, "
                                  "loglikelihood, multiple_choice)")


# -- registration ------------------------------------------------------------------------------------


def manifest():
    """What lmms-eval's registry needs for ``--model atv`` (the entry point,
    ``atv.experiments.eval_job:lmms_manifest``, also registers the probe-cell loader)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{ATVModel.__name__}")


def register() -> None:
    """Register ``--model atv`` in the running lmms-eval (for an install without the entry point)."""
    from lmms_eval import models

    models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    models.AVAILABLE_MODELS[MODEL_NAME] = ATVModel.__name__


# -- running tasks -----------------------------------------------------------------------------------


def run_lmms_tasks(model: nn.Module, processor, tasks: Sequence[str], *, manager=None, batch_size: int = 8,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, run: LmmsRun | None = None,
                   name: str | None = None) -> list[LmmsScore]:
    """Score an in-memory model on lmms-eval tasks (names known to ``manager``); one score per task, on
    every process of a multi-process run (see :mod:`evaluation.processes`).

    The main metric is the first of the task's ``metric_list``. ``run``: limit, stderr, samples and
    lmms-eval's result files; ``name`` labels the model in those files (default ``atv``).
    """
    lm = ATVModel(model=model, processor=processor, batch_size=batch_size, max_new_tokens=max_new_tokens)
    label = format_model_args({"pretrained": name}) if name else ""
    return evaluate_tasks(lm, tasks, manager=manager, run=run, model_args=label, batch_size=batch_size)


@dataclass
class LmmsTask:
    """An lmms-eval task as a probe-study benchmark: it scores itself through the bridge.

    ``evaluate(model, processor) -> BenchmarkResult`` with score = main metric x ``scale`` (a percentage:
    the default 100 fits metrics in [0, 1]; e.g. MME's perception score, out of 2000, takes ``scale=0.05``).
    """

    name: str
    kind: str = OPEN  # 'choice' or 'open': only labels the result (lmms-eval decides how it scores)
    scale: float = 100.0
    include_path: tuple[Path, ...] = ()
    include_defaults: bool = True
    batch_size: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    limit: int | None = None
    _manager: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in (CHOICE, OPEN):
            raise ConfigError(f"LmmsTask kind must be {CHOICE!r} or {OPEN!r}, got {self.kind!r}")
        if not self.scale > 0:
            raise ConfigError(f"scale must be > 0, got {self.scale}")

    def evaluate(self, model: nn.Module, processor) -> BenchmarkResult:
        if self._manager is None:  # indexing lmms-eval's tasks takes seconds: once per task object
            self._manager = task_manager(self.include_path, self.include_defaults)
        (score,) = run_lmms_tasks(model, processor, [self.name], manager=self._manager, batch_size=self.batch_size,
                                  max_new_tokens=self.max_new_tokens, run=LmmsRun(limit=self.limit))
        percent = score.score * self.scale
        if not (math.isfinite(percent) and 0.0 <= percent <= 100.0):
            raise ConfigError(f"lmms-eval task {self.name!r}: {score.metric} = {score.score} x scale {self.scale} "
                              f"is not a percentage; pass LmmsTask(..., scale=100 / <the metric's maximum>)")
        metrics_ = {f"lmms/{k}": v for k, v in score.metrics.items()}
        return BenchmarkResult(self.name, self.kind, score.n or 1, percent, None, metrics_)


# -- harness JSONL benchmarks as lmms-eval tasks -------------------------------------------------------


def harness_task_functions(folder: str | Path) -> SimpleNamespace:
    """lmms-eval task functions for harness-format records whose ``image`` is relative to ``folder``.

    doc_to_visual, doc_to_text (the question), choice_target (index of the answer among the options),
    open_results (VQA accuracy of the answer in [0, 1], the harness's metric).
    """
    folder = Path(folder)

    def doc_to_visual(doc: dict) -> list[Image.Image]:
        if not doc.get("image"):
            return []
        path = Path(doc["image"]) if Path(doc["image"]).is_absolute() else folder / doc["image"]
        return [open_image(path)]

    def doc_to_text(doc: dict) -> str:
        return doc["question"]

    def choice_target(doc: dict) -> int:
        return list(doc["options"]).index(doc["answer"])

    def open_results(doc: dict, results: list[str]) -> dict[str, float]:
        return {"vqa_acc": metrics.vqa_accuracy(results[0], list(doc["answers"]))}

    return SimpleNamespace(doc_to_visual=doc_to_visual, doc_to_text=doc_to_text, choice_target=choice_target,
                           open_results=open_results)


# The generated task module is this constant text: the records' folder (untrusted: it comes from a file
# name) reaches it as data, from the JSON file written beside it, never as source.
_UTILS = '''"""lmms-eval task functions over harness records (their folder: the JSON file beside this one)."""
import json
from pathlib import Path

from evaluation.lmms_bridge import harness_task_functions

_sidecar = json.loads(Path(__file__).with_suffix(".json").read_text(encoding="utf-8"))
_functions = harness_task_functions(_sidecar["folder"])
doc_to_visual, doc_to_text = _functions.doc_to_visual, _functions.doc_to_text
choice_target, open_results = _functions.choice_target, _functions.open_results
'''
TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")

_COMMON = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
doc_to_visual: !function {utils}.doc_to_visual
doc_to_text: !function {utils}.doc_to_text
"""
_CHOICE = """output_type: multiple_choice
doc_to_choice: options
doc_to_target: !function {utils}.choice_target
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
_OPEN = """output_type: generate_until
doc_to_target: answers
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: []
  do_sample: false
process_results: !function {utils}.open_results
metric_list:
  - metric: vqa_acc
    aggregation: mean
    higher_is_better: true
"""


def write_lmms_task(benchmark: Benchmark | str | Path, out_dir: str | Path, *, name: str | None = None,
                    max_new_tokens: int = 8) -> str:
    """Write an lmms-eval task (``<name>.yaml`` + ``<name>_utils.py`` in ``out_dir``) over a harness
    choice or open JSONL file, scored as the harness scores it (acc / VQA accuracy, in [0, 1]).

    Returns the task name (default ``atv_<benchmark name>``; letters, digits, '_' and '-' only); pass
    ``out_dir`` as an include path. The benchmark's file and folder reach the task as data: a quoted
    YAML string and ``<name>_utils.json``, never inside the generated ``<name>_utils.py``.
    """
    bench = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark)
    if bench.path is None or bench.kind not in (CHOICE, OPEN):
        raise ConfigError(f"benchmark {bench.name!r} ({bench.kind}) cannot become an lmms-eval task: it needs a "
                          "choice or open JSONL file")
    name = name or f"atv_{bench.name}"
    if not TASK_NAME.fullmatch(name):
        raise ConfigError(f"lmms-eval task name {name!r} may hold only letters, digits, '_' and '-'; pass "
                          "name='...' (the default is atv_<file stem>)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    utils = f"{name}_utils"
    (out_dir / f"{utils}.json").write_text(json.dumps({"folder": str(bench.path.resolve().parent)}),
                                           encoding="utf-8")
    (out_dir / f"{utils}.py").write_text(_UTILS, encoding="utf-8")
    data = json.dumps(str(bench.path.resolve()))  # a JSON string is a double-quoted YAML scalar: data only
    body = _COMMON.format(name=name, data=data, utils=utils)
    body += _CHOICE.format(utils=utils) if bench.kind == CHOICE else _OPEN.format(utils=utils,
                                                                                   max_new_tokens=max_new_tokens)
    (out_dir / f"{name}.yaml").write_text(body, encoding="utf-8")
    return name


__all__ = ["ATVModel", "DEFAULT_MAX_NEW_TOKENS", "INSTALL_HINT", "LmmsEvalMissing", "LmmsRun", "LmmsScore", "LmmsTask",
           "MODEL_NAME", "bridge_prompt", "cut_at_stop", "harness_task_functions", "manifest", "register",
           "run_lmms_tasks", "task_manager", "write_lmms_task"]
