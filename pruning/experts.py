"""Mixture-of-experts feed-forwards: fused expert weights pruned as (out, in) matrices, one per expert.

transformers keeps the experts of an MoE block as 3-D parameters of one module, ``gate_up_proj``
(E, 2I, H) and ``down_proj`` (E, H, I), called as ``experts(hidden (N, H), top_k_index (N, k),
top_k_weights (N, k))`` on the block's flattened tokens (N = B * T), after a router chose each token's
experts. Expert ``e``'s slice ``param[e]`` is a plain (out, in) weight, so it is scored and masked per
output row exactly as an nn.Linear (:class:`ExpertMatrix` is a writable view the engine treats as one).
Some families store the experts transposed ((E, H, 2I) / (E, I, H), applied as ``tokens @ param[e]``: Aria,
Llama4; the matrix is then ``param[e].T``), normalise each expert's output (Muse Spark), or call the experts
on router-scaled copies of every token (Llama4): :class:`ExpertLayout` names what :func:`check_layout` found.

Statistics of an expert come from exactly the tokens the router sent to it, within the calibration
pool: during the engine's dense pass the experts' forward is swapped for :func:`routed_forward` (or
:func:`scaled_forward`), the same routing loop as transformers' eager one (its output is checked bit for
bit against the module's own forward on the first call) that also records, per expert, the flat token indices and the
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
import inspect
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
# transformers' ``use_experts_implementation`` layout flags the routed loops require (the other two,
# ``is_transposed`` and ``has_post_expert_norm``, are served: see :class:`ExpertLayout`)
_REQUIRED_FLAGS = {"has_bias": False, "has_gate": True, "is_concatenated": True}


def find_experts(block: nn.Module) -> dict[str, nn.Module]:
    """Fused expert modules of a decoder block, by structure: a module (not a convolution) holding 3-D
    parameters of its own whose first dimension is the number of experts (its ``num_experts`` when it
    has one, else shared by a gate_up_proj/up_proj/down_proj). Names are relative to the block.

    A module with a ``record_routing`` method stands for the experts module it wraps (the MoT probe's routed
    experts): it is found in its place (unless its ``is_target()`` says False) and the modules inside it are not
    searched."""
    found, stand_ins = {}, []
    for name, module in block.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) or any(name.startswith(f"{s}.") for s in stand_ins):
            continue
        if callable(getattr(module, "record_routing", None)):
            if getattr(module, "is_target", lambda: True)():  # a stand-in may be out of play for now
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


@dataclass(frozen=True)
class ExpertLayout:
    """How a fused experts module stores and calls its experts (what :func:`check_layout` found).

    transposed: ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H), applied as ``tokens @ param[e]``
        (Aria, Llama4); else (E, 2I, H) and (E, H, I), applied as ``linear(tokens, param[e])``.
    post_norm: each expert's output goes through ``module.post_expert_norm`` before the routing weight.
    routing_args: called as ``experts(hidden (N, H), top_k_index (N, k), top_k_weights (N, k))``; else as
        ``experts(scaled (E * N, H))``, every token once per expert with the router's score already multiplied
        in, zero for the experts the router did not choose (Llama4).
    """

    transposed: bool = False
    post_norm: bool = False
    routing_args: bool = True

    def inner_size(self, module: nn.Module) -> int:
        """I, the width of an expert's ``act(gate) * up``."""
        return module.down_proj.shape[1 if self.transposed else 2]


def check_layout(name: str, module: nn.Module) -> ExpertLayout:
    """The layout of fused experts module ``module``; UnsupportedModelError (naming the layout) unless it holds
    gate_up_proj (E, 2I, H) + down_proj (E, H, I), or their transposes, with concatenated [gate; up] halves, no
    bias, and a forward called with the router's choices or with router-scaled inputs (see ExpertLayout)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    flags = {flag: getattr(module, flag, None) for flag in (*_REQUIRED_FLAGS, "is_transposed", "has_post_expert_norm")}
    shapes = isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == down.dim() == 3
    plain = shapes and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
    transposed = shapes and gate_up.shape[2] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[2]
    post_norm = bool(flags["has_post_expert_norm"])
    arguments = _forward_arguments(module)
    ok = ((plain or transposed) and flags["is_transposed"] in (None, transposed)
          and all(flags[f] in (None, value) for f, value in _REQUIRED_FLAGS.items())
          and (not post_norm or isinstance(getattr(module, "post_expert_norm", None), nn.Module))
          and arguments in (1, 3))
    if not ok:
        params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
        raise UnsupportedModelError(
            f"experts module {name} ({type(module).__name__}, parameters {params}, layout {flags}, forward with "
            f"{arguments} arguments) is not a layout this toolkit prunes (gate_up_proj (E, 2I, H) + down_proj "
            "(E, H, I) or their transposes, concatenated gate and up, no bias); exclude it from targets")
    return ExpertLayout(transposed=transposed, post_norm=post_norm, routing_args=arguments == 3)


def _forward_arguments(module: nn.Module) -> int:
    """How many tensors the module's forward takes (self excluded; transformers' wrappers keep the signature)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(type(module).forward).parameters.values()
    return sum(1 for p in params if p.kind in kinds and p.default is p.empty) - 1


class ExpertMatrix:
    """Expert ``index``'s (out, in) weight of the fused 3-D parameter ``module.<param>``, standing in for an
    nn.Linear: ``weight`` is a writable view (the transpose of ``param[index]`` for a transposed layout), so
    :func:`pruning.masks.apply_mask_` and ``weight.copy_`` act in place. The parameter is looked up at each access,
    as a Linear's weight is (offload hooks swap it)."""

    def __init__(self, module: nn.Module, param: str, index: int, transposed: bool = False):
        self.module, self.name, self.index, self.transposed = module, param, index, transposed
        shape = getattr(module, param).shape
        self.out_features, self.in_features = (shape[2], shape[1]) if transposed else (shape[1], shape[2])

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.name)

    @property
    def weight(self) -> torch.Tensor:
        matrix = self.param.data[self.index]
        return matrix.T if self.transposed else matrix


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
                   record: dict[str, Any], layout: ExpertLayout | None = None) -> torch.Tensor:
    """transformers' eager experts loop (same ops, same order), recording per expert what it saw.

    hidden: (N, H) flattened tokens; top_k_index / top_k_weights: (N, k). Fills ``record`` with
    ``n`` = N, ``hidden`` = the (N, H) input, ``tokens[e]`` = flat indices of the tokens routed to expert e
    and ``inner[e]`` = (len, I) the inputs of ``down_proj[e]``. Returns (N, H), as the module would.
    ``layout`` defaults to :func:`check_layout`'s reading of ``module``.
    """
    layout = check_layout(type(module).__name__, module) if layout is None else layout
    project = _projector(layout)
    n_experts = module.gate_up_proj.shape[0]
    out = torch.zeros_like(hidden)
    tokens = [torch.zeros(0, dtype=torch.long, device=hidden.device)] * n_experts
    inner = [hidden.new_zeros(0, layout.inner_size(module))] * n_experts
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)  # (E+1, k, N)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit:
        e = int(expert[0])
        if e == n_experts:  # the slot some routers use for "no expert"
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        gate_up = project(hidden[token_idx], module.gate_up_proj[e])
        gated = module._apply_gate(gate_up) if hasattr(module, "_apply_gate") else _apply_gate(module, gate_up)
        state = project(gated, module.down_proj[e])
        if layout.post_norm:
            state = module.post_expert_norm(state)
        state = state * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, state.to(out.dtype))
        tokens[e], inner[e] = token_idx, gated
    record.update(n=hidden.shape[0], hidden=hidden, tokens=tokens, inner=inner)
    return out


def scaled_forward(module: nn.Module, scaled: torch.Tensor, record: dict[str, Any],
                   layout: ExpertLayout | None = None) -> torch.Tensor:
    """The batched experts forward of router-scaled inputs (Llama4's; same ops, same order), recording per expert
    what it saw.

    scaled: (E * N, H), expert e's copy of the N tokens in rows e*N .. (e+1)*N, each multiplied by the router's
    score, which is exactly 0 for the experts the router did not choose (sigmoid(-inf)). The tokens routed to
    expert e are its non-zero rows: the zero rows add nothing to the output and nothing to the statistics. Fills
    ``record`` with ``n`` = N, ``tokens[e]``, ``outer[e]`` = (len, H) the inputs of ``gate_up_proj[e]`` (the
    scaled rows the matrix really reads) and ``inner[e]`` = (len, I) those of ``down_proj[e]``. Returns (E * N, H).
    """
    layout = check_layout(type(module).__name__, module) if layout is None else layout
    n_experts, width = module.gate_up_proj.shape[0], scaled.shape[-1]
    per_expert = scaled.view(n_experts, -1, width)  # (E, N, H)
    gate_up_w, down_w = module.gate_up_proj, module.down_proj
    if not layout.transposed:
        gate_up_w, down_w = gate_up_w.transpose(1, 2), down_w.transpose(1, 2)
    gate, up = torch.bmm(per_expert, gate_up_w).chunk(2, dim=-1)
    gated = up * module.act_fn(gate)  # (E, N, I)
    out = torch.bmm(gated, down_w)
    if layout.post_norm:
        out = module.post_expert_norm(out)
    with torch.no_grad():
        routed = per_expert.ne(0).any(dim=-1)  # (E, N)
    tokens = [routed[e].nonzero().squeeze(1) for e in range(n_experts)]
    record.update(n=per_expert.shape[1], tokens=tokens, outer=[per_expert[e, t] for e, t in enumerate(tokens)],
                  inner=[gated[e, t] for e, t in enumerate(tokens)])
    return out.view(-1, width)


def _projector(layout: ExpertLayout):
    """x (n, in) and one expert's stored matrix -> x projected, as the module computes it."""
    return torch.matmul if layout.transposed else nn.functional.linear


def _gate_up_rows(record: dict[str, Any], expert: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, selector) of the pooled rows ``gate_up_proj[expert]`` read in a recorded call; ``keep`` (len,) bool
    over the expert's tokens. The routed loop shares one (N, H) input between experts; the scaled one has its own."""
    if "outer" in record:
        return record["outer"][expert], keep
    return record["hidden"], record["tokens"][expert][keep]


def _routing_call(name: str, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                  layout: ExpertLayout) -> tuple[torch.Tensor, ...]:
    """The tensors of an ``experts(...)`` call, (hidden, top_k_index, top_k_weights) or (scaled,) as ``layout``
    says; UnsupportedModelError for another call."""
    names = ("hidden_states", "top_k_index", "top_k_weights") if layout.routing_args else ("hidden_states",)
    values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    n = len(names)
    if len(values) != n or len(args) + len(kwargs) != n or not all(isinstance(v, torch.Tensor) for v in values):
        raise UnsupportedModelError(
            f"experts module {name} ({type(module).__name__}) was called with {len(args)} positional arguments and "
            f"keywords {sorted(kwargs)}, not as experts({', '.join(names)})")
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
    layouts: dict[str, ExpertLayout] = field(default_factory=dict)  # module -> its layout
    verified: set[str] = field(default_factory=set)
    observed: bool = False  # statistics were collected (not for weight-only scorers)

    def __bool__(self) -> bool:
        return bool(self.matrices)

    def parameters(self) -> list[nn.Parameter]:
        """The 3-D parameters the matrices are slices of (each once)."""
        return list({id(m.param): m.param for m in self.matrices.values()}.values())

    def stash_features(self) -> int:
        """Values stashed per token by the routing records (the input, once or per expert, and ``act(gate) * up``
        of each of the token's top-k experts; k from the module's config, else every expert): for the engine's
        memory estimate."""
        total = 0
        for name, module in self.modules.items():
            layout = self.layouts[name]
            top_k = getattr(getattr(module, "config", None), "num_experts_per_tok", module.gate_up_proj.shape[0])
            hidden, inner = module.down_proj.shape[2 if layout.transposed else 1], layout.inner_size(module)
            total += (hidden if layout.routing_args else top_k * hidden) + top_k * inner
        return total

    def add_matrices(self, name: str, module: nn.Module, param: str, layout: ExpertLayout) -> None:
        self.modules[name], self.layouts[name] = module, layout
        weight = getattr(module, param)
        for e in range(weight.shape[0]):
            self.matrices[f"{name}.{param}[{e}]"] = ExpertMatrix(module, param, e, layout.transposed)
            self.owner[f"{name}.{param}[{e}]"] = (name, e)
        self.pooled.setdefault(name, [0] * weight.shape[0])
        self.routed.setdefault(name, [0] * weight.shape[0])

    # -- recording ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Within the block every experts module runs :func:`routed_forward` (or :func:`scaled_forward`, as its
        layout says); yields module name -> its record."""
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
            layout = self.layouts[name]
            call = _routing_call(name, module, args, kwargs, layout)
            records[name] = {}
            stand_in = getattr(module, "record_routing", None)  # records its own routing (see find_experts)
            if stand_in is not None:
                out = stand_in(*call, records[name])
            else:
                loop = routed_forward if layout.routing_args else scaled_forward
                out = loop(module, *call, records[name], layout)
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
            needs: str, device: torch.device, reads: dict[str, torch.Tensor | None] | None = None) -> None:
        """Feed each expert's accumulators with its routed tokens that are in ``pool`` (B, T). ``reads``: module ->
        the (B, T) tokens it reads in order (modality-isolated expert sets, see ``Adapter.expert_tokens``); a module
        absent or None reads all B*T tokens."""
        self.observed = True
        for name in self.modules:
            record = records.get(name)
            rows = None if reads is None or reads.get(name) is None else reads[name].reshape(-1).nonzero().squeeze(1)
            if record is None and rows is not None and rows.numel() == 0:
                continue  # an expert set that no token of the batch was assigned to is not called
            if record is None:
                raise UnsupportedModelError(f"experts module {name} was not called during the layer's forward")
            flat_pool, flat_valid = pool.reshape(-1), valid.reshape(-1)
            if rows is not None:
                flat_pool, flat_valid = flat_pool[rows.to(flat_pool.device)], flat_valid[rows.to(flat_valid.device)]
            if record["n"] != flat_pool.numel():
                raise UnsupportedModelError(
                    f"experts module {name} saw {record['n']} tokens, the batch has {flat_pool.numel()} "
                    f"({'B*T' if rows is None else 'assigned to it'}); cannot map its tokens back to positions")
            for e, token_idx in enumerate(record["tokens"]):
                keep = flat_pool[token_idx]
                self.pooled[name][e] += int(keep.sum())
                self.routed[name][e] += int(flat_valid[token_idx].sum())
                self._add_rows(f"{name}.gate_up_proj[{e}]", *_gate_up_rows(record, e, keep), samples, needs, device)
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
    experts = find_experts(block) if adapter.prunes_experts else {}
    if not experts:
        return adapter.named_linears(model, index, targets), ExpertTargets()
    found = ExpertTargets()
    if tuple(targets) == DECODER_PROJ:  # the default: every discovered projection and every expert matrix
        for name, module in experts.items():
            layout = check_layout(name, module)
            for param in EXPERT_PARAMS:
                found.add_matrices(name, module, param, layout)
        return adapter.named_linears(model, index, targets), found
    linear_names: list[str] = []
    for target in targets:
        parent, _, leaf = target.rpartition(".")
        if _has(block, target):
            module = block.get_submodule(parent) if parent else block
            if parent in experts and leaf in EXPERT_PARAMS:  # a fused parameter named directly
                found.add_matrices(parent, module, leaf, check_layout(parent, module))
            else:
                linear_names.append(target)
            continue
        owners = [n for n in experts if not parent or n.startswith(parent + ".")]
        params = [p for p, leaves in EXPERT_PARAMS.items() if leaf in leaves]
        if not owners or not params:
            linear_names.append(target)  # let the adapter raise its usual error
            continue
        for name in owners:
            found.add_matrices(name, experts[name], params[0], check_layout(name, experts[name]))
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
