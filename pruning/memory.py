"""A memory plan before any work: what a pruning run will hold at its peak, from the model config alone.

The engine (:mod:`pruning.engine`) holds, per device:

* **weights**: all of them, or with offload the modules outside the decoder plus two decoder layers' worth
  (the layer being pruned, and the memory-mapped checkpoint pages of the layer read, or the pruned copy
  written back, at the same time: measured by ``benchmarks/scale.py``);
* **activations**: every calibration sample's hidden states at the current layer (``N x T x hidden`` in
  the model dtype, on ``ExecutionConfig.offload_device``), plus a second copy with ``propagate='dense'``;
* **statistics**: one fp32 accumulator per distinct Linear input of a layer (``in`` floats for Wanda,
  ``in x in`` for SparseGPT's Hessian);
* **stash**: with ATV's two-pass schedule, the inputs of every target Linear of one layer for all samples;
* **workspace**: one batch's forward through one layer (the recorded Linear inputs and the MLP's
  intermediates) and the mask computation of the largest Linear (fp32 scores, a k-th value copy, bool masks).

Everything is arithmetic on config numbers (no model is built), so ``atv prune`` can refuse a run that
will not fit before loading anything::

    plan = plan_memory(PruneConfig("atv"), ExecutionConfig(), AutoConfig.from_pretrained(src), 128, 1024, 1, "auto")
    check_memory(plan)   # InsufficientMemoryError when a device's peak exceeds its free memory
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import PruneConfig
from .errors import InsufficientMemoryError
from .execution import ExecutionConfig
from .registry import get_pool, get_scorer
from .scores import STATS_DTYPE

log = logging.getLogger(__name__)

STATS_BYTES = torch.tensor([], dtype=STATS_DTYPE).element_size()
OFFLOAD_LAYER_COPIES = 2     # offload: the onloaded layer + its mapped file pages (see the module docstring)
MASK_BYTES_PER_WEIGHT = 14   # mask of the largest Linear: fp32 scores + fp32 temporary + k-th value copy + 2 bools
SPARSEGPT_COPIES = 3         # SparseGPT's solver: Hessian, its inverse and Cholesky factor (in x in fp32 each)
# Linear name (its last dotted part) -> which input it reads; Linears reading the same input share statistics
_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
           "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}
PRUNE_REMEDIES = ("Keep decoder layers on disk with --offload, use fewer --nsamples (or a smaller --max-length), "
                  "or --schedule three-pass (no activation stash); --no-memory-check runs it anyway")
PROBE_REMEDIES = ("Load it in a smaller dtype (--dtype bfloat16), spread it over devices (--device-map auto), or use "
                  "fewer --nsamples (or a smaller --max-length); --no-memory-check runs it anyway")
EVAL_REMEDIES = ("Load it in a smaller dtype (--dtype bfloat16), spread it over devices (--device-map auto), or use a "
                 "smaller --batch-size; --no-memory-check runs it anyway")
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model config that set its memory (parameters, not bytes)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    attn_out: int            # heads x head_dim (q and o projections)
    kv_out: int              # key/value heads x head_dim
    heads: int
    layer_params: int        # one decoder layer's projections
    other_params: int        # embeddings, untied head, vision tower and projector (approximate)

    @property
    def total_params(self) -> int:
        return self.layers * self.layer_params + self.other_params

    def in_features(self, target: str) -> int:
        """Input features of decoder Linear ``target`` (e.g. 'mlp.down_proj')."""
        group = _INPUTS.get(target.rsplit(".", 1)[-1])
        return {"attn_out": self.attn_out, "mlp_out": self.intermediate}.get(group, self.hidden)


def model_shape(model_config: Any) -> ModelShape:
    """:class:`ModelShape` of a transformers (vision-language) config; the vision tower is approximated as ViT
    blocks (4 h^2 + 2 h i per layer) plus a two-layer projector, from its own config."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    h, layers, vocab = int(text.hidden_size), int(text.num_hidden_layers), int(text.vocab_size)
    i = int(getattr(text, "intermediate_size", None) or 4 * h)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads) * head_dim
    experts = int(getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 1)
    expert_i = int(getattr(text, "moe_intermediate_size", None) or i) if experts > 1 else i
    layer = 2 * h * heads * head_dim + 2 * h * kv + experts * 3 * h * expert_i
    tied = bool(getattr(model_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
    other = vocab * h * (1 if tied else 2) + _vision_params(getattr(model_config, "vision_config", None), h)
    return ModelShape(h, i, layers, vocab, heads * head_dim, kv, heads, layer, other)


def _vision_params(vision: Any, text_hidden: int) -> int:
    if vision is None:
        return 0
    vh = int(getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", 0) or 0)
    depth = int(getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None) or 0)
    vi = int(getattr(vision, "intermediate_size", None) or (getattr(vision, "mlp_ratio", None) or 4) * vh)
    return depth * (4 * vh * vh + 2 * vh * vi) + vh * text_hidden + text_hidden * text_hidden


@dataclass
class MemoryPlan:
    """Estimated peak bytes of a pruning run, by component; ``devices`` says where each component lives."""

    weights: int
    activations: int
    statistics: int
    stash: int
    workspace: int
    schedule: str                                          # the pass schedule the engine will choose
    devices: dict[str, str] = field(default_factory=dict)  # component -> device ('dispatched': accelerate's)

    def by_device(self) -> dict[str, int]:
        """Peak bytes per device (components on 'dispatched' are placed by accelerate's max_memory)."""
        totals: dict[str, int] = {}
        for name in ("weights", "activations", "statistics", "stash", "workspace"):
            device = self.devices.get(name, "cpu")
            totals[device] = totals.get(device, 0) + getattr(self, name)
        return totals

    def peak(self) -> int:
        """Sum over every component and device."""
        return self.weights + self.activations + self.statistics + self.stash + self.workspace

    def summary(self) -> str:
        parts = ", ".join(f"{name} {_gib(getattr(self, name))} ({self.devices.get(name, 'cpu')})"
                          for name in ("weights", "activations", "statistics", "stash", "workspace"))
        return f"memory plan ({self.schedule}): {parts}; total {_gib(self.peak())}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak": self.peak()}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def dtype_bytes(dtype: str | torch.dtype, model_config: Any = None) -> int:
    """Bytes per weight of ``dtype`` ('auto' = the checkpoint's own dtype in ``model_config``, else float32)."""
    if dtype == "auto":
        dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "float32"
    if isinstance(dtype, str):
        dtype = _DTYPE_NAMES.get(dtype.removeprefix("torch."), torch.float32)
    return torch.tensor([], dtype=dtype).element_size()


def stash_fits(tokens: int, features: int, element_size: int, budget_gb: float) -> bool:
    """The 'auto' schedule's rule: two passes when the stash (``tokens x features`` values) fits the budget."""
    return tokens * features * element_size / 2**30 <= budget_gb


def plan_memory(config: PruneConfig, execution: ExecutionConfig, model_config: Any, n_samples: int, seq_len: int,
                batch_size: int, dtype: str | torch.dtype, *, device: str | None = None,
                dispatched: bool = False) -> MemoryPlan:
    """Peak memory of pruning a model of ``model_config`` (no model is built).

    n_samples, seq_len, batch_size: calibration samples, tokens per sample (an upper bound), samples per
    forward. dtype: the weights' dtype ('auto' = the config's). device: where layers run (default: the
    execution device with offload, else cpu); dispatched: weights placed by an accelerate device map.
    Offload is planned as ``atv prune --offload`` runs it: decoder layers read from the checkpoint on disk
    (a model already in memory keeps all its weights there).
    """
    shape, b = model_shape(model_config), dtype_bytes(dtype, model_config)
    compute = str(execution.layer_device or device or "cpu")
    host = str(execution.activations_device)
    calibrated = config.needs_calibration
    tokens, batch_tokens = n_samples * seq_len if calibrated else 0, batch_size * seq_len if calibrated else 0
    linears = {t: shape.in_features(t) for t in config.targets}
    per_input = config.pool is not None and get_pool(config.pool).needs_attention  # TAMP: one accumulator per Linear
    distinct = linears if per_input else {_INPUTS.get(t.rsplit(".", 1)[-1], t): f for t, f in linears.items()}

    layer_weights = shape.layer_params * b
    weights = shape.total_params * b
    if execution.offload:
        weights = shape.other_params * b + OFFLOAD_LAYER_COPIES * layer_weights
    hidden = tokens * shape.hidden * b
    activations = hidden * (2 if config.propagate == "dense" else 1)
    if batch_size > 1:  # padded batches carry a (B, 1, T, T) attention mask
        activations += n_samples * seq_len * seq_len * b

    needs = get_scorer(config.scorer).needs
    statistics = 0
    if needs == "sq_norms":
        statistics = sum(distinct.values()) * STATS_BYTES
    elif needs == "hessian":
        statistics = sum(f * f for f in distinct.values()) * STATS_BYTES

    schedule = "three-pass"
    stash = 0
    if config.needs_mean_drift and calibrated:
        schedule = execution.schedule
        if schedule == "auto":
            fits = stash_fits(tokens, sum(linears.values()), b, execution.stash_budget_gb)
            schedule = "two-pass" if fits else "three-pass"
        if schedule == "two-pass":  # one tensor per distinct input when it stays put, one per Linear when moved
            stashed = distinct if host == compute else linears
            stash = tokens * (sum(stashed.values()) * b + STATS_BYTES)  # + each token's drift
    elif calibrated:
        schedule = "two-pass"

    largest = max(shape.in_features(t) * _out_features(shape, t) for t in config.targets)
    recorded = batch_tokens * (sum(distinct.values()) + shape.attn_out + 2 * shape.kv_out + 2 * shape.intermediate
                               + 2 * shape.hidden) * b
    if per_input:  # eager attention probabilities (B, heads, T, T)
        recorded += batch_size * shape.heads * seq_len * seq_len * b * 2
    masks = largest * MASK_BYTES_PER_WEIGHT + shape.layer_params  # + the layer's bool masks
    if needs == "hessian":
        masks += SPARSEGPT_COPIES * max(linears.values()) ** 2 * STATS_BYTES
    workspace = recorded + masks

    weights_on = "dispatched" if dispatched and compute != "cpu" else compute
    devices = {"weights": weights_on, "activations": host, "statistics": compute, "stash": host,
               "workspace": compute}
    return MemoryPlan(weights, activations, statistics, stash, workspace, schedule, devices)


def plan_eval_memory(model_config: Any, batch_size: int, seq_len: int, dtype: str | torch.dtype, *,
                     device: str | None = None, dispatched: bool = False, probed: bool = False) -> MemoryPlan:
    """Peak memory of scoring a model of ``model_config`` (``atv eval``; no model is built).

    weights: every parameter (``probed``: plus the visual copy of each decoder layer's QKV and FFN that the
    MoT probe adds); activations: one batch's hidden states and MLP intermediates (``batch_size x seq_len``
    tokens, model dtype); workspace: that batch's fp32 logits and one layer's attention probabilities.
    """
    shape, b = model_shape(model_config), dtype_bytes(dtype, model_config)
    weights = shape.total_params * b
    if probed:  # o_proj is shared by both paths; q, k, v and the MLP are duplicated
        weights += shape.layers * (shape.layer_params - shape.attn_out * shape.hidden) * b
    tokens = batch_size * seq_len
    activations = tokens * (4 * shape.hidden + 2 * shape.intermediate) * b
    workspace = tokens * shape.vocab * STATS_BYTES + batch_size * shape.heads * seq_len * seq_len * b
    compute = str(device or "cpu")
    devices = {name: compute for name in ("activations", "statistics", "stash", "workspace")}
    devices["weights"] = "dispatched" if dispatched and compute != "cpu" else compute
    return MemoryPlan(weights, activations, 0, 0, workspace, "eval", devices)


def plan_probe_memory(config: PruneConfig, model_config: Any, n_samples: int, seq_len: int, batch_size: int,
                      dtype: str | torch.dtype, *, device: str | None = None,
                      dispatched: bool = False) -> MemoryPlan:
    """Peak memory of an MoT probe study (``atv probe``) in one process: the probed model's weights (the visual
    copy of every decoder layer's QKV and FFN included), then the larger of a cell's pruning (``config``'s
    statistics, activations and workspace over ``n_samples`` samples of ``seq_len`` tokens) and its
    evaluation (``batch_size`` items)."""
    prune = plan_memory(config, ExecutionConfig(), model_config, n_samples, seq_len, 1, dtype, device=device,
                        dispatched=dispatched)
    scoring = plan_eval_memory(model_config, batch_size, seq_len, dtype, device=device, dispatched=dispatched,
                               probed=True)
    return MemoryPlan(scoring.weights, max(prune.activations, scoring.activations), prune.statistics, prune.stash,
                      max(prune.workspace, scoring.workspace), prune.schedule, prune.devices)


def _out_features(shape: ModelShape, target: str) -> int:
    group = _INPUTS.get(target.rsplit(".", 1)[-1])
    return {"attn_in": shape.attn_out, "attn_out": shape.hidden, "mlp_in": shape.intermediate,
            "mlp_out": shape.hidden}.get(group, shape.hidden)


# -- what is available -------------------------------------------------------------------------------
def available_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device`` now (None when unknown): MemAvailable of /proc/meminfo (else accelerate's
    estimate) for the CPU; the backend's ``mem_get_info`` (torch.cuda, torch.xpu, ...) for an accelerator."""
    device = torch.device(device)
    if device.type == "cpu":
        return _meminfo_available() or _accelerate_cpu_memory()
    backend = getattr(torch, device.type, None)
    mem_get_info = getattr(backend, "mem_get_info", None)
    if mem_get_info is None:
        return None
    try:
        return int(mem_get_info(device)[0])
    except (RuntimeError, AssertionError, TypeError):  # backend present but not usable here
        return None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _accelerate_cpu_memory() -> int | None:
    from accelerate.utils import get_max_memory

    value = get_max_memory().get("cpu")
    return int(value) if isinstance(value, (int, float)) else None


def check_memory(plan: MemoryPlan, available: Callable[[str], int | None] | None = None,
                 remedies: str = PRUNE_REMEDIES) -> dict[str, int]:
    """Raise :class:`InsufficientMemoryError` when a device's planned peak exceeds what ``available`` reports;
    returns the planned peak per checked device. Devices whose free memory is unknown, and weights dispatched
    by an accelerate device map (capped by its max_memory), are not checked. ``available``: device ->
    free bytes or None (default :func:`available_memory`); ``remedies``: what the message suggests."""
    available = available or available_memory
    checked = {}
    for device, need in plan.by_device().items():
        if device == "dispatched":
            continue
        free = available(device)
        if free is None:
            log.info("free memory on %s unknown: not checked", device)
            continue
        checked[device] = need
        if need > free:
            raise InsufficientMemoryError(
                f"this run needs about {_gib(need)} on {device} but {_gib(free)} is free ({plan.summary()}). "
                + remedies)
    return checked
