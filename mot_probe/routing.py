"""The modality-routed Linear of the MoT probe (and :class:`RoutedModule`, what it shares with the routed
experts of ``mot_probe/experts.py``).

A :class:`RoutedLinear` stands where a decoder projection (q/k/v, gate/up/down) was. It keeps the
original ``nn.Linear`` as ``base_layer`` (peft's name; :meth:`RoutedModule.get_base_layer`) and serves
both modalities with it until one path is about to diverge (be pruned): only then is that path
materialised as its own copy in ``paths``. So an unpruned probe costs no extra weight memory and
computes exactly what the original model computes, and a probe with one pruned path holds exactly
one extra copy of that path's Linears.

Each token goes through its own modality's copy only; attention still mixes all tokens because only
the projections are routed. The (B, T) modality mask is held by a :class:`ModalityRouter` shared by
all routed Linears of a model and set once per forward (from ``input_ids``) or per replayed batch.
A projection whose input is not the token sequence reads the image memory of a cross-attention layer
(Mllama's K/V; encoder-decoder models are out of scope): all its rows take the visual copy.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator

import torch
from torch import nn

from pruning.adapters import tokens_align
from pruning.errors import ToolkitError

PATHS = ("text", "visual")


class RoutingError(ToolkitError):
    """A routed forward was asked for without a modality mask that fits its input."""


class ModalityRouter:
    """Holds the current (B, T) bool mask, True at visual tokens, and what is derived from it.

    Sibling projections (q/k/v, gate/up) read the same input tensor, so the router keeps the text
    and visual rows of the last input it split: the siblings reuse them instead of gathering again.
    Setting a new mask drops both caches.
    """

    def __init__(self) -> None:
        self.visual = None

    @property
    def visual(self) -> torch.Tensor | None:
        return self._visual

    @visual.setter
    def visual(self, mask: torch.Tensor | None) -> None:
        self._visual = mask
        self._split: tuple[torch.Tensor, torch.Tensor] | None = None  # flat text / visual positions
        self._rows: tuple | None = None  # (input, its version, its text rows, its visual rows)

    def split(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (B*T) positions of the text and the visual tokens of the current mask."""
        if self._split is None:
            flat = self._visual.reshape(-1).to(device)
            self._split = ((~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1))
        return self._split

    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text rows and the visual rows of ``x`` (B, T, d) as two (n, d) tensors."""
        cached = self._rows
        if cached is not None and cached[0] is x and cached[1] == x._version:
            return cached[2], cached[3]
        text_idx, visual_idx = self.split(x.device)
        flat = x.reshape(-1, x.shape[-1])
        parts = (flat.index_select(0, text_idx), flat.index_select(0, visual_idx))
        self._rows = (x, x._version, *parts)
        return parts

    @contextlib.contextmanager
    def route(self, visual: torch.Tensor) -> Iterator[None]:
        """Use ``visual`` for the forwards inside the block, then restore the previous mask."""
        previous, self.visual = self.visual, visual
        try:
            yield
        finally:
            self.visual = previous


def check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"unknown pathway {path!r}; choose one of {PATHS}")
    return path


class RoutedModule(nn.Module):
    """Text and visual copies of one module ``base_layer``; what the routed Linear and the routed experts share.

    Both paths are served by ``base_layer`` (the original module, as peft's wrappers keep it) until one is about to
    diverge (be pruned): only then does that path get its own copy in ``paths``. ``active`` names the path that
    pruning tools see through the weight properties.
    """

    def __init__(self, base: nn.Module, router: ModalityRouter):
        super().__init__()
        self.base_layer = base
        self.paths = nn.ModuleDict()  # 'text' / 'visual' -> own copy, only once that path diverges
        self.active = "text"
        object.__setattr__(self, "router", router)  # shared, not a submodule

    def get_base_layer(self) -> nn.Module:
        """The original module (peft's accessor): both paths' module until a path gets its own copy."""
        return self.base_layer

    @property
    def base(self) -> nn.Module:
        """Deprecated name of :attr:`base_layer`."""
        warnings.warn("RoutedModule.base is deprecated; use base_layer or get_base_layer()", DeprecationWarning,
                      stacklevel=2)
        return self.base_layer

    def path(self, name: str) -> nn.Module:
        """The module that serves path ``name`` (its own copy, or the shared base layer)."""
        return self.paths[name] if name in self.paths else self.base_layer

    def materialise_(self, name: str) -> nn.Module:
        """Give path ``name`` its own copy of the base weights (same device and dtype; a ``config`` attribute, as
        transformers' experts hold, stays the shared object so that switching implementations reaches the copy)."""
        check_path(name)
        if name not in self.paths:
            config = getattr(self.base_layer, "config", None)
            self.paths[name] = copy.deepcopy(self.base_layer, {} if config is None else {id(config): config})
        return self.paths[name]

    def reset_(self, name: str | None = None) -> None:
        """Drop the copy of path ``name`` (both when None): that path is the dense base again."""
        for key in [name] if name else list(self.paths):
            if key in self.paths:
                del self.paths[key]


class RoutedLinear(RoutedModule):
    """Text and visual copies of one Linear; tokens are routed by the shared router's mask.

    ``active`` names the path that pruning tools see through :attr:`weight` (the engine treats a
    routed Linear as the Linear of its active path).

    Args:
        base: the original Linear; both paths start as it (no copy until a path is pruned).
        router: the router holding the current visual-token mask, shared by every routed module of the model.
    """

    def __init__(self, base: nn.Linear, router: ModalityRouter):
        super().__init__(base, router)
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.path(self.active).weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.path(self.active).bias

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        text, visual = self.path("text"), self.path("visual")
        if text is visual:
            return text(x)
        mask = self.router.visual
        if mask is None:
            raise RoutingError(f"routed forward needs a modality mask of shape {tuple(x.shape[:-1])}, got None; "
                               "call the model with input_ids (the probe routes by the visual token ids), or replay "
                               "its decoder layers with the probe's adapter (adapter=probe.adapter)")
        text_idx, visual_idx = self.router.split(x.device)
        if not tokens_align(mask.shape, x.shape[:-1]):
            if visual_idx.numel() == 0:
                raise RoutingError(f"input rows {tuple(x.shape[:-1])} are not the batch's tokens {tuple(mask.shape)} "
                                   "and the batch holds no image: the probe can route such rows only as the image "
                                   "memory a cross-attention layer reads")
            return visual(x)  # rows that are not the tokens: the image memory a cross-attention layer reads
        if visual_idx.numel() == 0:
            return text(x)
        if text_idx.numel() == 0:
            return visual(x)
        text_rows, visual_rows = self.router.rows(x)
        out = x.new_empty(text_idx.numel() + visual_idx.numel(), self.out_features)
        out.index_copy_(0, text_idx, text(text_rows))
        out.index_copy_(0, visual_idx, visual(visual_rows))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, own copies={list(self.paths) or 'none'}"
