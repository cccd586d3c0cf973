"""The modality-routed mixture-of-experts module of the MoT probe.

transformers keeps an MoE block's experts as one module of 3-D parameters, ``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I), called as ``experts(hidden (N, H), top_k_index (N, k), top_k_weights (N, k))`` on the
block's flattened tokens (N = B * T) after the block's router chose each token's experts. A
:class:`RoutedExperts` stands where that module was: the router stays shared (it is not duplicated, so every
token keeps the experts it was routed to), and each token is computed by its own modality's copy of those
experts. As for a routed Linear, a path gets its own copy only when it is about to be pruned.

The pruning engine finds a RoutedExperts in place of the experts module (``pruning.experts.find_experts``:
a module with a ``record_routing`` method stands for fused experts) and sees the active path's parameters,
so a path's experts are pruned per expert and per row exactly as the engine prunes fused experts on a plain
model, with statistics from the tokens the router sent to each expert (``record_routing``).

Llama4 calls its experts as ``experts(scaled (E * N, H))``: every token once per expert, row ``e * N + n`` holding
token n scaled by the router's score for expert e (0 when not chosen). :class:`RoutedScaledExperts` routes that
call: the (N,) modality mask tiles over the E blocks of rows, so each path's module is called on the (E * N', H)
rows of its own N' tokens, in the same layout.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from pruning.errors import UnsupportedModelError
from pruning.experts import check_layout, routed_forward, scaled_forward

from .routing import ModalityRouter, RoutedModule, RoutingError

# The calls a routed experts module may take: transformers' fused experts, or Llama4's router-scaled rows.
EXPERTS_CALL = ("hidden_states", "top_k_index", "top_k_weights")
SCALED_CALL = ("hidden_states",)


def routing_problem(name: str, module: nn.Module) -> str | None:
    """Why the experts ``module`` (named ``name`` in its block) cannot be routed per modality, or None.

    Routable: a layout the engine prunes (:func:`pruning.experts.check_layout`), called as
    ``experts(hidden_states, top_k_index, top_k_weights)`` on per-token rows or as ``experts(hidden_states)`` on
    router-scaled (E * N, H) rows.
    """
    if not name:
        return "it is the decoder block itself"
    try:
        layout = check_layout(name, module)
    except UnsupportedModelError as err:
        return str(err)
    call = EXPERTS_CALL if layout.routing_args else SCALED_CALL
    params = tuple(inspect.signature(type(module).forward).parameters)[1:]
    if params != call:
        return (f"experts module {name} ({type(module).__name__}) is called as forward{params}, not as "
                f"experts{EXPERTS_CALL} on per-token rows nor as experts{SCALED_CALL} on router-scaled rows")
    return None


def route_experts(base: nn.Module, router: ModalityRouter) -> RoutedExperts:
    """The routed module for the fused experts ``base`` (routable: see :func:`routing_problem`), by its call."""
    kind = RoutedExperts if check_layout(type(base).__name__, base).routing_args else RoutedScaledExperts
    return kind(base, router)


class RoutedExperts(RoutedModule):
    """Text and visual copies of a fused experts module; each token goes through its own modality's copy.

    Invariants: with no copy (or with copies equal to ``base_layer``) it computes exactly what ``base_layer`` computes;
    ``gate_up_proj``/``down_proj`` are the active path's parameters (what the engine prunes); ``path(name)``
    is a module of ``base_layer``'s own type, so unloading puts back the original module type and state_dict keys.

    Args:
        base: the original experts module (3-D ``gate_up_proj`` / ``down_proj`` parameters).
        router: the router holding the current visual-token mask, shared by every routed module of the model.
    """

    def __init__(self, base: nn.Module, router: ModalityRouter):
        super().__init__(base, router)
        self.num_experts = base.gate_up_proj.shape[0]

    @property
    def gate_up_proj(self) -> nn.Parameter:  # (E, 2I, H) of the active path
        return self.path(self.active).gate_up_proj

    @property
    def down_proj(self) -> nn.Parameter:  # (E, H, I) of the active path
        return self.path(self.active).down_proj

    @property
    def config(self) -> Any:
        """The wrapped module's config (its top-k), shared by the copies."""
        return getattr(self.base_layer, "config", None)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # (N, H), (N, k), (N, k) -> (N, H)
        parts = self._parts(hidden_states.shape[0], hidden_states.device)
        if len(parts) == 1:
            return parts[0][0](hidden_states, top_k_index, top_k_weights)
        out = hidden_states.new_empty(hidden_states.shape)
        for module, rows in parts:
            out.index_copy_(0, rows, module(hidden_states[rows], top_k_index[rows], top_k_weights[rows]))
        return out

    def record_routing(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       record: dict[str, Any]) -> torch.Tensor:
        """The routed forward through transformers' eager loop (:func:`pruning.experts.routed_forward`), filling
        ``record`` as that function does for all N tokens: each expert's tokens in the loop's own order (by
        top-k position, then token), whichever path computed them. Returns (N, H), bitwise what :meth:`forward`
        returns under the eager experts implementation."""
        parts = self._parts(hidden_states.shape[0], hidden_states.device)
        if len(parts) == 1:
            return routed_forward(parts[0][0], hidden_states, top_k_index, top_k_weights, record)
        out = hidden_states.new_empty(hidden_states.shape)
        records = []
        for module, rows in parts:
            part: dict[str, Any] = {}
            out.index_copy_(0, rows, routed_forward(module, hidden_states[rows], top_k_index[rows],
                                                    top_k_weights[rows], part))
            records.append((rows, part))
        record.update(n=hidden_states.shape[0], hidden=hidden_states, **merge_records(records, top_k_index))
        return out

    def _parts(self, tokens: int, device: torch.device) -> list[tuple[nn.Module, torch.Tensor | None]]:
        """(module, flat token indices) per path that has tokens, for a call on ``tokens`` (B*T) tokens; one
        (module, None) when one module serves them all."""
        text, visual = self.path("text"), self.path("visual")
        if text is visual:
            return [(text, None)]
        mask = self.router.visual
        if mask is None or mask.numel() != tokens:
            got = None if mask is None else tuple(mask.shape)
            raise RoutingError(f"routed experts need a modality mask of {tokens} tokens (B*T), got "
                               f"{got}; call the model with input_ids (the probe routes by the visual token ids)")
        text_idx, visual_idx = self.router.split(device)
        if visual_idx.numel() == 0:
            return [(text, None)]
        if text_idx.numel() == 0:
            return [(visual, None)]
        return [(text, text_idx), (visual, visual_idx)]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, own copies={list(self.paths) or 'none'}"


def merge_records(parts: list[tuple[torch.Tensor, dict[str, Any]]], top_k_index: torch.Tensor) -> dict[str, list]:
    """Per-path routing records -> one record over all N tokens: ``tokens[e]`` (flat indices) and ``inner[e]``
    (their rows of ``act(gate) * up``), ordered as transformers' loop visits them (top-k position, then token).

    parts: (flat rows of the path's tokens, the record of :func:`pruning.experts.routed_forward` on them).
    """
    n = top_k_index.shape[0]
    tokens, inner = [], []
    for e in range(len(parts[0][1]["tokens"])):
        found = torch.cat([rows[record["tokens"][e]] for rows, record in parts])
        values = torch.cat([record["inner"][e] for _, record in parts])
        position = (top_k_index[found] == e).long().argmax(dim=1)  # which of its k choices sent the token to e
        order = torch.argsort(position * n + found)
        tokens.append(found[order])
        inner.append(values[order])
    return {"tokens": tokens, "inner": inner}


class RoutedScaledExperts(RoutedExperts):
    """Text and visual copies of experts called on router-scaled rows (Llama4's ``experts(scaled (E * N, H))``,
    row ``e * N + n`` = token n scaled for expert e); each token's E rows go through its own modality's copy.

    Invariants as :class:`RoutedExperts`; a path's module is called on the (E * N', H) rows of its N' tokens in
    the same expert-major layout, so each expert's rows keep their order.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (E * N, H) -> (E * N, H)
        parts = self._parts(self._tokens(hidden_states), hidden_states.device)
        if len(parts) == 1:
            return parts[0][0](hidden_states)
        return self._split_call(hidden_states, parts, lambda module, rows: module(rows))

    def record_routing(self, hidden_states: torch.Tensor, record: dict[str, Any]) -> torch.Tensor:
        """The forward through :func:`pruning.experts.scaled_forward` (the module's batched loop, same ops),
        filling ``record`` as that function does for all N tokens: each expert's tokens in increasing order,
        whichever path computed them. Returns (E * N, H), bitwise what :meth:`forward` returns."""
        parts = self._parts(self._tokens(hidden_states), hidden_states.device)
        if len(parts) == 1:
            return scaled_forward(parts[0][0], hidden_states, record)
        records: list[dict[str, Any]] = []

        def run(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
            records.append({})
            return scaled_forward(module, rows, records[-1])

        out = self._split_call(hidden_states, parts, run)
        merged = merge_scaled_records([(tokens, part) for (_, tokens), part in zip(parts, records)])
        record.update(n=self._tokens(hidden_states), **merged)
        return out

    def _tokens(self, hidden_states: torch.Tensor) -> int:
        """N, the tokens of an (E * N, H) call."""
        rows = hidden_states.shape[0]
        if hidden_states.dim() != 2 or rows % self.num_experts:
            raise RoutingError(f"router-scaled experts take (E * N, H) rows with E = {self.num_experts}, got "
                               f"{tuple(hidden_states.shape)}")
        return rows // self.num_experts

    def _split_call(self, hidden_states: torch.Tensor, parts: list[tuple[nn.Module, torch.Tensor]],
                    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``run(module, rows)`` per (module, flat token indices) part on the (E * N', H) rows of its tokens,
        reassembled into the (E * N, H) layout."""
        width = hidden_states.shape[-1]
        per_expert = hidden_states.view(self.num_experts, -1, width)  # (E, N, H)
        out = per_expert.new_empty(per_expert.shape)
        for module, tokens in parts:
            got = run(module, per_expert.index_select(1, tokens).reshape(-1, width))  # (E * N', H)
            out.index_copy_(1, tokens, got.view(self.num_experts, tokens.numel(), width))
        return out.view(-1, width)


def merge_scaled_records(parts: list[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, list]:
    """Per-path records of :func:`pruning.experts.scaled_forward` -> one over all N tokens: ``tokens[e]``,
    ``outer[e]`` and ``inner[e]`` ordered by token index, as the unsplit call records them.

    parts: (flat indices of the path's tokens, the record of its call on their rows)."""
    merged: dict[str, list] = {"tokens": [], "outer": [], "inner": []}
    for e in range(len(parts[0][1]["tokens"])):
        found = torch.cat([rows[record["tokens"][e]] for rows, record in parts])
        order = torch.argsort(found)
        merged["tokens"].append(found[order])
        for key in ("outer", "inner"):
            merged[key].append(torch.cat([record[key][e] for _, record in parts])[order])
    return merged


class PathExperts(RoutedExperts):
    """An expert set that the model itself runs on one modality's tokens only (ERNIE 4.5 VL's text and vision experts,
    see ``Adapter.modality_experts``): not routed, it belongs to pathway ``owner``, whose module computes every call.
    Pruning ``owner`` prunes it (per expert, from the pooled tokens the router sent to each); pruning the other
    pathway leaves it alone (``is_target``), so the other pathway's copy is never made.
    """

    def __init__(self, base: nn.Module, router: ModalityRouter, owner: str):
        super().__init__(base, router)
        self.owner = owner

    def is_target(self) -> bool:
        """Whether the engine prunes it now: only while its own pathway is the active one."""
        return self.active == self.owner

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # (N', H), (N', k), (N', k) -> (N', H)
        return self.path(self.owner)(hidden_states, top_k_index, top_k_weights)

    def record_routing(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       record: dict[str, Any]) -> torch.Tensor:
        return routed_forward(self.path(self.owner), hidden_states, top_k_index, top_k_weights, record)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, pathway={self.owner}, own copies={list(self.paths) or 'none'}"
