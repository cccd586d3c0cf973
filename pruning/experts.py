"""Mixture-of-experts feed-forwards: fused expert weights pruned as (out, in) matrices, one per expert.

transformers keeps the experts of an MoE block as 3-D parameters of one module, ``gate_up_proj``
(E, 2I, H) and ``down_proj`` (E, H, I), called as ``experts(hidden (N, H), top_k_index (N, k),
top_k_weights (N, k))`` on the block's flattened tokens (N = B * T), after a router chose each token's
experts. Expert ``e``'s slice ``param[e]`` is a plain (out, in) weight, so it is scored and masked per
output row exactly as an nn.Linear (:class:`ExpertMatrix` is a writable view the engine treats as one).

Statistics of an expert come from exactly the tokens the router sent to it, within the calibration
pool: during the engine's dense pass the experts' forward is swapped for :func:`routed_forward`, the
same routing loop as transformers' eager one (its output is checked bit for bit against the module's
own forward on the first call) that also records, per expert, the flat token indices and the
intermediate activations ``act(gate) * up`` (the inputs of ``down_proj[e]``). The (B, T) pool mask then
selects rows: ``pool.reshape(-1)[token_index]``. Experts that saw no pooled token have no statistics
and are pruned by magnitude; the report lists them. Routers and their weights are never pruned.

Targets: on a block whose MLP is an MoE block, ``mlp.gate_proj``/``mlp.up_proj`` name the experts'
``gate_up_proj`` and ``mlp.down_proj`` their ``down_proj`` (plus the same-named Linears of shared
experts, e.g. ``mlp.shared_experts.gate_proj``, which are ordinary projections). A 3-D parameter can
also be named directly (``mlp.experts.down_proj``). Dense blocks resolve exactly as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .adapters import DECODER_PROJ
from .errors import ConfigError, UnsupportedModelError
from .registry import Scorer, get_scorer
from .stats import ACCUMULATORS, Hessian, SquaredNorms

# fused 3-D parameter -> the leaf names of the Linear targets it stands for
EXPERT_PARAMS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
# key of the routing records in the engine's per-batch activations dict
ROUTED = "__routed_experts__"
# transformers' ``use_experts_implementation`` layout flags and the value the routed loop supports
_STANDARD_LAYOUT = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
                    "has_post_expert_norm": False}


def find_experts(block: nn.Module) -> dict[str, nn.Module]:
    """Fused expert modules of a decoder block, by structure: a module (not a convolution) holding 3-D
    parameters of its own whose first dimension is the number of experts (its ``num_experts`` when it
    has one, else shared by a gate_up_proj/up_proj/down_proj). Names are relative to the block.

    A module with a ``record_routing`` method stands for the experts module it wraps (the MoT probe's routed
    experts): it is found in its place and the modules inside it are not searched."""
    found, stand_ins = {}, []
    for name, module in block.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) or any(name.startswith(f"{s}.") for s in stand_ins):
            continue
        if callable(getattr(module, "record_routing", None)):
            found[name] = module
            stand_ins.append(name)
            continue
        params = dict((n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3)
        if not params or len({p.shape[0] for p in params.values()}) != 1:
            continue
        count = next(iter(params.values())).shape[0]
        if getattr(module, "num_experts", None) == count or params.keys() & {"gate_up_proj", "up_proj", "down_proj"}:
            found[name] = module
    return found


def check_layout(name: str, module: nn.Module) -> None:
    """UnsupportedModelError unless ``module`` stores its experts as gate_up_proj (E, 2I, H) + down_proj (E, H, I)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    flags = {flag: getattr(module, flag, standard) for flag, standard in _STANDARD_LAYOUT.items()}
    shapes_ok = (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
                 and gate_up.dim() == down.dim() == 3
                 and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1])
    if not shapes_ok or flags != _STANDARD_LAYOUT:
        params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
        raise UnsupportedModelError(
            f"experts module {name} ({type(module).__name__}, parameters {params}, layout {flags}) is not the "
            "gate_up_proj (E, 2I, H) + down_proj (E, H, I) layout this toolkit prunes; exclude it from targets")


class ExpertMatrix:
    """Expert ``index``'s (out, in) weight of the fused 3-D parameter ``module.<param>``, standing in for an
    nn.Linear: ``weight`` is a writable view, so :func:`pruning.masks.apply_mask_` and ``weight.copy_`` act in
    place. The parameter is looked up at each access, as a Linear's weight is (offload hooks swap it)."""

    def __init__(self, module: nn.Module, param: str, index: int):
        self.module, self.name, self.index = module, param, index
        shape = getattr(module, param).shape
        self.out_features, self.in_features = shape[1], shape[2]

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.name)

    @property
    def weight(self) -> torch.Tensor:
        return self.param.data[self.index]


@contextlib.contextmanager
def eager_experts(model: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
    """When the decoder ``layers`` hold fused experts, run the model with transformers' eager experts loop (the
    one :func:`routed_forward` reproduces), so the dense and the pruned passes of a run compute the same way;
    the previous implementation comes back afterwards. Models without experts are left alone."""
    getter = getattr(model, "get_experts_implementation", None)
    enabled = getter is not None and any(find_experts(layer) for layer in layers)
    previous = getter() if enabled else None
    if previous is None or set(previous.values()) <= {"eager", None}:
        yield
        return
    model.set_experts_implementation("eager")
    try:
        yield
    finally:
        model.set_experts_implementation(previous)


def routed_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   record: dict[str, Any]) -> torch.Tensor:
    """transformers' eager experts loop (same ops, same order), recording per expert what it saw.

    hidden: (N, H) flattened tokens; top_k_index / top_k_weights: (N, k). Fills ``record`` with
    ``n`` = N, ``hidden`` = the (N, H) input, ``tokens[e]`` = flat indices of the tokens routed to expert e
    and ``inner[e]`` = (len, I) the inputs of ``down_proj[e]``. Returns (N, H), as the module would.
    """
    n_experts = module.gate_up_proj.shape[0]
    out = torch.zeros_like(hidden)
    empty = hidden.new_zeros(0, module.down_proj.shape[2])
    tokens = [torch.zeros(0, dtype=torch.long, device=hidden.device)] * n_experts
    inner = [empty] * n_experts
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)  # (E+1, k, N)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit:
        e = int(expert[0])
        if e == n_experts:  # the slot some routers use for "no expert"
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        gate_up = nn.functional.linear(hidden[token_idx], module.gate_up_proj[e])
        gated = module._apply_gate(gate_up) if hasattr(module, "_apply_gate") else _apply_gate(module, gate_up)
        state = nn.functional.linear(gated, module.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, state.to(out.dtype))
        tokens[e], inner[e] = token_idx, gated
    record.update(n=hidden.shape[0], hidden=hidden, tokens=tokens, inner=inner)
    return out


def _routing_call(name: str, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """(hidden, top_k_index, top_k_weights) of an ``experts(...)`` call; UnsupportedModelError for another call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    if len(values) != 3 or len(args) + len(kwargs) != 3 or not all(isinstance(v, torch.Tensor) for v in values):
        raise UnsupportedModelError(
            f"experts module {name} ({type(module).__name__}) was called with {len(args)} positional arguments and "
            f"keywords {sorted(kwargs)}, not as experts(hidden_states, top_k_index, top_k_weights)")
    return tuple(values)


def _apply_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


@dataclass
class ExpertTargets:
    """The expert matrices of one decoder block that are pruning targets, their statistics and routing counts.

    modules: block-relative name -> fused experts module; matrices: '<module>.<param>[e]' -> ExpertMatrix.
    """

    modules: dict[str, nn.Module] = field(default_factory=dict)
    matrices: dict[str, ExpertMatrix] = field(default_factory=dict)
    stats: dict[str, SquaredNorms | Hessian] = field(default_factory=dict)
    pooled: dict[str, list[int]] = field(default_factory=dict)   # module -> pooled tokens per expert
    routed: dict[str, list[int]] = field(default_factory=dict)   # module -> non-padding tokens per expert
    owner: dict[str, tuple[str, int]] = field(default_factory=dict)  # matrix -> (module, expert index)
    verified: set[str] = field(default_factory=set)
    observed: bool = False  # statistics were collected (not for weight-only scorers)

    def __bool__(self) -> bool:
        return bool(self.matrices)

    def parameters(self) -> list[nn.Parameter]:
        """The 3-D parameters the matrices are slices of (each once)."""
        return list({id(m.param): m.param for m in self.matrices.values()}.values())

    def stash_features(self) -> int:
        """Values stashed per token by the routing records (the input, and ``act(gate) * up`` of each of the
        token's top-k experts; k from the module's config, else every expert): for the engine's memory estimate."""
        total = 0
        for module in self.modules.values():
            top_k = getattr(getattr(module, "config", None), "num_experts_per_tok", module.gate_up_proj.shape[0])
            total += module.gate_up_proj.shape[2] + top_k * module.down_proj.shape[2]
        return total

    def add_matrices(self, name: str, module: nn.Module, param: str) -> None:
        self.modules[name] = module
        weight = getattr(module, param)
        for e in range(weight.shape[0]):
            self.matrices[f"{name}.{param}[{e}]"] = ExpertMatrix(module, param, e)
            self.owner[f"{name}.{param}[{e}]"] = (name, e)
        self.pooled.setdefault(name, [0] * weight.shape[0])
        self.routed.setdefault(name, [0] * weight.shape[0])

    # -- recording ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Within the block every experts module runs :func:`routed_forward`; yields module name -> its record."""
        records: dict[str, dict[str, Any]] = {}
        saved = {}
        try:
            for name, module in self.modules.items():
                saved[name] = module.__dict__.get("forward")
                module.forward = self._recorder(name, module, records)
            yield records
        finally:
            for name, module in self.modules.items():
                if saved.get(name) is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = saved[name]

    def _recorder(self, name: str, module: nn.Module, records: dict[str, dict[str, Any]]):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            call = _routing_call(name, module, args, kwargs)
            records[name] = {}
            stand_in = getattr(module, "record_routing", None)  # records its own routing (see find_experts)
            out = stand_in(*call, records[name]) if stand_in else routed_forward(module, *call, records[name])
            if name not in self.verified:  # once per block: the loop must be the module's own, bit for bit
                own = type(module).forward(module, *args, **kwargs)
                if not torch.equal(own, out):
                    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
                    raise UnsupportedModelError(
                        f"experts module {name} ({type(module).__name__}, experts implementation {implementation!r}) "
                        "does not compute transformers' eager routing loop; its per-expert statistics cannot be "
                        "recorded exactly")
                self.verified.add(name)
            return out
        return forward

    # -- statistics --------------------------------------------------------------------------
    def add(self, records: dict[str, dict[str, Any]], pool: torch.Tensor, valid: torch.Tensor, samples: int,
            needs: str, device: torch.device) -> None:
        """Feed each expert's accumulators with its routed tokens that are in ``pool`` (B, T)."""
        flat_pool, flat_valid = pool.reshape(-1), valid.reshape(-1)
        self.observed = True
        for name in self.modules:
            record = records.get(name)
            if record is None:
                raise UnsupportedModelError(f"experts module {name} was not called during the layer's forward")
            if record["n"] != flat_pool.numel():
                raise UnsupportedModelError(
                    f"experts module {name} saw {record['n']} tokens, the batch has {flat_pool.numel()} (B*T); "
                    "cannot map its tokens back to positions")
            for e, token_idx in enumerate(record["tokens"]):
                keep = flat_pool[token_idx]
                self.pooled[name][e] += int(keep.sum())
                self.routed[name][e] += int(flat_valid[token_idx].sum())
                self._add_rows(f"{name}.gate_up_proj[{e}]", record["hidden"], token_idx[keep], samples, needs, device)
                self._add_rows(f"{name}.down_proj[{e}]", record["inner"][e], keep, samples, needs, device)

    def _add_rows(self, key: str, source: torch.Tensor, select: torch.Tensor, samples: int, needs: str,
                  device: torch.device) -> None:
        """Add ``source[select]`` to matrix ``key``'s accumulator (when ``key`` is a target)."""
        if key not in self.matrices:
            return
        if key not in self.stats:
            self.stats[key] = ACCUMULATORS[needs](self.matrices[key].in_features, device=device)
        self.stats[key].add(source[select], samples=samples)

    def unrouted(self) -> dict[str, list[int]]:
        """module -> experts that saw no pooled token (pruned by magnitude)."""
        return {name: [e for e, n in enumerate(counts) if n == 0] for name, counts in self.pooled.items()}

    def report(self) -> dict[str, dict[str, list[int]]]:
        """module -> pooled_tokens / routed_tokens per expert and the unrouted experts ({} without statistics)."""
        if not self.observed:
            return {}
        unrouted = self.unrouted()
        return {name: {"pooled_tokens": self.pooled[name], "routed_tokens": self.routed[name],
                       "unrouted": unrouted[name]} for name in self.modules}

    # -- masks -------------------------------------------------------------------------------
    def masks(self, scorer: Scorer, sparsity: float, nm: tuple[int, int] | None,
              counts: dict[str, int] | None = None,
              **options: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(masks, new weights) per expert matrix; an expert without statistics falls back to magnitude.
        ``counts`` (non-uniform allocations): exact weights to prune per expert matrix key."""
        magnitude = get_scorer("magnitude")
        masks, new_weights = {}, {}
        for key, matrix in self.matrices.items():
            name, e = self.owner[key]
            use = scorer if scorer.needs is None or self.pooled[name][e] > 0 else magnitude
            statistic = None if use.needs is None else self.stats[key].result()
            count = None if counts is None else counts[key]
            masks[key], new_weight = use.prune(matrix.weight, statistic, sparsity, nm, count, **options)
            if new_weight is not None:
                new_weights[key] = new_weight
        return masks, new_weights


def block_targets(adapter: Any, model: nn.Module, index: int,
                  targets: tuple[str, ...]) -> tuple[dict[str, nn.Module], ExpertTargets]:
    """The Linears (via ``adapter.named_linears``) and the expert matrices that ``targets`` name in block ``index``.

    A block without fused experts gives exactly ``adapter.named_linears(model, index, targets)`` and no experts.
    """
    block = adapter.decoder_layers(model)[index]
    experts = find_experts(block) if getattr(adapter, "prunes_experts", True) else {}
    if not experts:
        return adapter.named_linears(model, index, targets), ExpertTargets()
    found = ExpertTargets()
    if tuple(targets) == DECODER_PROJ:  # the default: every discovered projection and every expert matrix
        for name, module in experts.items():
            check_layout(name, module)
            for param in EXPERT_PARAMS:
                found.add_matrices(name, module, param)
        return adapter.named_linears(model, index, targets), found
    linear_names: list[str] = []
    for target in targets:
        parent, _, leaf = target.rpartition(".")
        if _has(block, target):
            module = block.get_submodule(parent) if parent else block
            if parent in experts and leaf in EXPERT_PARAMS:  # a fused parameter named directly
                check_layout(parent, module)
                found.add_matrices(parent, module, leaf)
            else:
                linear_names.append(target)
            continue
        owners = [n for n in experts if not parent or n.startswith(parent + ".")]
        params = [p for p, leaves in EXPERT_PARAMS.items() if leaf in leaves]
        if not owners or not params:
            linear_names.append(target)  # let the adapter raise its usual error
            continue
        for name in owners:
            check_layout(name, experts[name])
            found.add_matrices(name, experts[name], params[0])
        linear_names += _shared_linears(block, parent, leaf, experts)
    linears = adapter.named_linears(model, index, tuple(dict.fromkeys(linear_names))) if linear_names else {}
    return linears, found


def _has(block: nn.Module, target: str) -> bool:
    try:
        block.get_submodule(target)
        return True
    except AttributeError:
        parent, _, leaf = target.rpartition(".")
        try:
            return isinstance(getattr(block.get_submodule(parent) if parent else block, leaf), nn.Parameter)
        except AttributeError:
            return False


def _shared_linears(block: nn.Module, parent: str, leaf: str, experts: dict[str, nn.Module]) -> list[str]:
    """Linears named ``leaf`` under ``parent`` outside the fused experts (shared experts), block-relative."""
    scope = block.get_submodule(parent) if parent else block
    prefix = f"{parent}." if parent else ""
    return [prefix + name for name, module in scope.named_modules()
            if name.rpartition(".")[2] == leaf and isinstance(module, nn.Linear)
            and not any((prefix + name).startswith(e + ".") for e in experts)]


def check_config(layers: nn.ModuleList, indices: list[int], pool_needs_attention: bool, model_type: str) -> None:
    """Combinations the expert path cannot serve, refused up front (``indices``: the layers to prune)."""
    moe = [i for i in indices if find_experts(layers[i])]
    if moe and pool_needs_attention:
        raise ConfigError(f"{model_type}: decoder layers {moe} hold fused experts; attention pools (TAMP) select "
                          "tokens per Linear from its outputs, which fused experts do not have; use another pool")
