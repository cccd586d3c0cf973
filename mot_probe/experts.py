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
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from pruning.errors import UnsupportedModelError
from pruning.experts import check_layout, routed_forward

from .routing import ModalityRouter, RoutedModule, RoutingError

# The call every routed experts module must take (transformers' fused experts).
EXPERTS_CALL = ("hidden_states", "top_k_index", "top_k_weights")


def routing_problem(name: str, module: nn.Module) -> str | None:
    """Why the experts ``module`` (named ``name`` in its block) cannot be routed per modality, or None.

    Routable: the gate_up_proj (E, 2I, H) + down_proj (E, H, I) layout the engine prunes, called as
    ``experts(hidden_states, top_k_index, top_k_weights)`` on per-token rows.
    """
    if not name:
        return "it is the decoder block itself"
    try:
        check_layout(name, module)
    except UnsupportedModelError as err:
        return str(err)
    params = tuple(inspect.signature(type(module).forward).parameters)[1:]
    if params != EXPERTS_CALL:
        return (f"experts module {name} ({type(module).__name__}) is called as forward{params}, not as "
                f"experts{EXPERTS_CALL} on per-token rows")
    return None


class RoutedExperts(RoutedModule):
    """Text and visual copies of a fused experts module; each token goes through its own modality's copy.

    Invariants: with no copy (or with copies equal to ``base``) it computes exactly what ``base`` computes;
    ``gate_up_proj``/``down_proj`` are the active path's parameters (what the engine prunes); ``path(name)``
    is a module of ``base``'s own type, so unloading puts back the original module type and state_dict keys.
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
        return getattr(self.base, "config", None)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # (N, H), (N, k), (N, k) -> (N, H)
        parts = self._parts(hidden_states)
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
        parts = self._parts(hidden_states)
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

    def _parts(self, hidden_states: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor | None]]:
        """(module, flat rows) per path that has tokens; one (module, None) when one module serves them all."""
        text, visual = self.path("text"), self.path("visual")
        if text is visual:
            return [(text, None)]
        mask = self.router.visual
        if mask is None or mask.numel() != hidden_states.shape[0]:
            got = None if mask is None else tuple(mask.shape)
            raise RoutingError(f"routed experts need a modality mask of {hidden_states.shape[0]} tokens (B*T), got "
                               f"{got}; call the model with input_ids (the probe routes by the visual token ids)")
        text_idx, visual_idx = self.router.split(hidden_states.device)
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
