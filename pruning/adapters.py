"""Per-family knowledge of HF vision-language models.

Everything the rest of the toolkit needs to know about an architecture lives here: where the
decoder layers are, which token ids mark visual positions, and how to capture the exact inputs of
every decoder layer so that a layer can be replayed on its own (bitwise equal to the full forward).

Capture works the same way for every family: each decoder layer's ``forward`` is swapped for a
recorder that stores the keyword arguments the model passes to it (attention mask, rotary
embeddings, ...) and returns its input unchanged, so one cheap pass records the per-layer
arguments of every layer, including families whose layers receive different masks or rotary
tables (Gemma3's sliding and full layers). Families that change the hidden states *between*
layers (Qwen3-VL's DeepStack) record what they need and re-apply it in :meth:`after_layer`.

Example::

    adapter = get_adapter(model)
    batch = adapter.capture(model, inputs)             # layer-0 input + per-layer kwargs
    h = batch.hidden
    for i, layer in enumerate(adapter.decoder_layers(model)):
        h = adapter.replay(model, i, h, batch)         # == the full model, layer by layer
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from .errors import CalibrationError, UnsupportedModelError

# The seven projections of a decoder block, relative to the block.
ATTN_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJ = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DECODER_PROJ = ATTN_PROJ + MLP_PROJ

_TOKEN_ID_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


class _CaptureDone(Exception):
    """Raised by the last layer's recorder to skip the norm and lm_head of the capture pass."""


@dataclass
class CapturedBatch:
    """One calibration batch at the input of the decoder.

    hidden: (B, T, C) input of decoder layer 0.
    layer_kwargs: the keyword arguments the model passed to each decoder layer (one dict per layer;
        tensors shared between layers are shared here too).
    visual: (B, T) bool, True at image/video token positions.
    valid: (B, T) bool, False at padding positions.
    extras: family-specific state applied between layers (e.g. DeepStack features).
    """

    hidden: torch.Tensor
    layer_kwargs: list[dict[str, Any]]
    visual: torch.Tensor
    valid: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "CapturedBatch":
        """Move every tensor (kwargs and extras included) to ``device``, keeping shared tensors shared."""
        memo: dict[int, Any] = {}
        move = lambda obj: map_tensors(obj, lambda t: t.to(device), memo)  # noqa: E731
        return CapturedBatch(
            hidden=move(self.hidden),
            layer_kwargs=[move(kw) for kw in self.layer_kwargs],
            visual=move(self.visual),
            valid=move(self.valid),
            extras=move(self.extras),
        )


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], memo: dict[int, Any] | None = None) -> Any:
    """Apply ``fn`` to every tensor inside nested dicts/lists/tuples; a tensor seen twice is mapped once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = fn(obj)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        mapped = [map_tensors(v, fn, memo) for v in obj]
        return type(obj)(mapped) if isinstance(obj, list) else tuple(mapped)
    return obj


class Adapter:
    """Default behaviour, right for most families; subclasses override what differs."""

    name: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()

    # -- structure -------------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder module whose forward runs the layers."""
        return model.get_decoder()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def named_linears(self, model: nn.Module, index: int, names: tuple[str, ...] = DECODER_PROJ) -> dict[str, nn.Linear]:
        """The Linears ``names`` (relative to the block) of decoder layer ``index``."""
        layer = self.decoder_layers(model)[index]
        found = {}
        for name in names:
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                valid = [n for n, m in layer.named_modules() if n and _is_linear_like(m)]
                raise UnsupportedModelError(f"target {name!r} is not a module of decoder layer {index}; valid "
                                            f"targets: {valid}") from None
            if not _is_linear_like(module):
                raise UnsupportedModelError(f"{name} of decoder layer {index} is a {type(module).__name__}, not nn.Linear")
            found[name] = module
        return found

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The self-attention module of a decoder layer (returns (output, probabilities) under eager attention)."""
        return layer.self_attn

    # -- modality --------------------------------------------------------------------------
    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        """Ids of the placeholder tokens whose positions hold image/video features."""
        ids: list[int] = []
        for attr in _TOKEN_ID_ATTRS:
            value = getattr(model.config, attr, None)
            if isinstance(value, int) and value not in ids:
                ids.append(value)
        return tuple(ids)

    def visual_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool mask, True where ``input_ids`` holds an image or video token."""
        ids = torch.tensor(self.visual_token_ids(model), dtype=input_ids.dtype, device=input_ids.device)
        return torch.isin(input_ids, ids)

    # -- capture and replay ----------------------------------------------------------------
    @contextlib.contextmanager
    def record_extras(self, model: nn.Module, extras: dict[str, Any]) -> Iterator[None]:
        """Record family-specific state during the capture pass (nothing by default)."""
        yield

    def after_layer(self, model: nn.Module, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """What the model does to the hidden states between layer ``index`` and the next (nothing by default)."""
        return hidden

    @torch.no_grad()
    def capture(self, model: nn.Module, inputs: dict[str, Any]) -> CapturedBatch:
        """Run ``model`` on ``inputs`` with every decoder layer replaced by a recorder.

        The recorders return their input, so the pass costs the embeddings and the vision tower
        only; the last one stops the forward before the final norm and the LM head.
        """
        if "input_ids" not in inputs:
            raise CalibrationError("calibration inputs need 'input_ids' (to locate visual tokens); got keys "
                                   f"{sorted(inputs)}")
        layers = self.decoder_layers(model)
        recorded: list[dict[str, Any] | None] = [None] * len(layers)
        first: dict[str, torch.Tensor] = {}
        extras: dict[str, Any] = {}

        def recorder(index: int) -> Callable[..., torch.Tensor]:
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if len(args) > 1:
                    raise UnsupportedModelError(
                        f"decoder layer {index} was called with {len(args)} positional arguments; "
                        "only hidden_states may be positional for exact replay")
                if index == 0:
                    first["hidden"] = hidden
                recorded[index] = kwargs
                if index == len(layers) - 1:
                    raise _CaptureDone
                return hidden
            return forward

        # an instance-level forward (e.g. an accelerate offload hook) is put back afterwards
        saved = [layer.__dict__.get("forward") for layer in layers]
        try:
            for i, layer in enumerate(layers):
                layer.forward = recorder(i)
            with self.record_extras(model, extras):
                try:
                    model(**inputs, use_cache=False)
                except _CaptureDone:
                    pass
        finally:
            for layer, forward in zip(layers, saved):
                if forward is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = forward
        if "hidden" not in first or any(kw is None for kw in recorded):
            raise UnsupportedModelError(f"{type(model).__name__}: the forward did not call every decoder layer")
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        return CapturedBatch(first["hidden"], recorded, self.visual_mask(model, input_ids), valid, extras)

    def replay(self, model: nn.Module, index: int, hidden: torch.Tensor, batch: CapturedBatch,
               layer: nn.Module | None = None) -> torch.Tensor:
        """Run decoder layer ``index`` (or ``layer``, e.g. an offloaded copy) on ``hidden`` as the model would."""
        layer = self.decoder_layers(model)[index] if layer is None else layer
        out = layer(hidden, **batch.layer_kwargs[index])
        out = out[0] if isinstance(out, tuple) else out
        return self.after_layer(model, index, out, batch.extras)


_REGISTRY: dict[str, Adapter] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter of every ``model_type`` it lists."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls()
    return cls


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA-1.5 and Pixtral checkpoints (model_type 'llava')."""

    name = "llava"
    model_types = ("llava",)


@register_adapter
class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT; its image-newline features sit on image-token positions too."""

    name = "llava_next"
    model_types = ("llava_next",)


@register_adapter
class LlavaOneVisionAdapter(Adapter):
    name = "llava_onevision"
    model_types = ("llava_onevision",)


@register_adapter
class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: M-RoPE positions come from the model forward, captured as kwargs."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")


@register_adapter
class Qwen3VLAdapter(Adapter):
    """Qwen3-VL: DeepStack adds visual features to the hidden states after the first layers."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)

    @contextlib.contextmanager
    def record_extras(self, model: nn.Module, extras: dict[str, Any]) -> Iterator[None]:
        def hook(_module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
            extras["visual_pos_masks"] = kwargs.get("visual_pos_masks")
            extras["deepstack_visual_embeds"] = kwargs.get("deepstack_visual_embeds")

        handle = self.language_model(model).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def after_layer(self, model: nn.Module, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        embeds = extras.get("deepstack_visual_embeds")
        if embeds is None or index >= len(embeds):
            return hidden
        return self.language_model(model)._deepstack_process(hidden, extras["visual_pos_masks"], embeds[index])


@register_adapter
class Gemma3Adapter(Adapter):
    """Gemma3: sliding and full-attention layers get different masks and rotary tables (captured per layer)."""

    name = "gemma3"
    model_types = ("gemma3",)


@register_adapter
class Idefics3Adapter(Adapter):
    """Idefics3 and SmolVLM: the decoder is ``model.text_model``."""

    name = "idefics3"
    model_types = ("idefics3", "smolvlm")

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.text_model


@register_adapter
class InternVLAdapter(Adapter):
    name = "internvl"
    model_types = ("internvl",)


@register_adapter
class Mistral3Adapter(Adapter):
    """Mistral3 (Pixtral vision tower); [IMG_BREAK]/[IMG_END] markers are text, not visual tokens."""

    name = "mistral3"
    model_types = ("mistral3",)


class GenericAdapter(Adapter):
    """Fallback for unregistered families: finds the one ModuleList of decoder blocks by introspection."""

    name = "generic"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        candidates = [
            (name, module) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) > 0
            and all(_is_decoder_block(block) for block in module)
            and not any(part in name.lower() for part in ("vision", "visual", "image", "encoder"))
        ]
        if len(candidates) != 1:
            found = [name for name, _ in candidates] or "none"
            raise UnsupportedModelError(
                f"cannot decide which module list holds the decoder layers of {type(model).__name__} "
                f"(config.model_type={getattr(model.config, 'model_type', None)!r}); candidates: {found}. "
                "Register an Adapter subclass for this family with @register_adapter.")
        return candidates[0][1]

    def language_model(self, model: nn.Module) -> nn.Module:
        layers = self.decoder_layers(model)
        for module in model.modules():
            if any(child is layers for child in module.children()):
                return module
        raise UnsupportedModelError(f"no parent module found for the decoder layers of {type(model).__name__}")


def _is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear, or a module standing in for one (e.g. the probe's routed Linear)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "in_features")


def _is_decoder_block(block: nn.Module) -> bool:
    names = dict(block.named_modules())
    return all(isinstance(names.get(n), nn.Linear) for n in DECODER_PROJ)


# A model may carry its own adapter under this attribute (the MoT probe attaches one that routes).
ATTACHED_ADAPTER = "_atv_adapter"


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter attached to ``model``, else the one registered for ``model.config.model_type``,
    else the introspecting fallback.

    Raises UnsupportedModelError when none can locate the decoder layers.
    """
    attached = getattr(model, ATTACHED_ADAPTER, None)
    if attached is not None:
        return attached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = _REGISTRY.get(model_type)
    if adapter is not None:
        return adapter
    adapter = GenericAdapter()
    adapter.decoder_layers(model)  # raises a clear error when it cannot decide
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)
