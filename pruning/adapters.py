"""Per-family knowledge of HF vision-language models.

Everything the rest of the toolkit needs to know about an architecture lives here: where the
decoder layers are, which token ids mark visual positions, and how to capture the exact inputs of
every decoder layer so that a layer can be replayed on its own (bitwise equal to the full forward).

Decoder blocks and their projections are found by structure (:func:`find_decoder_layers`,
:func:`block_projections`): fused (``qkv_proj``, ``gate_up_proj``, ``query_key_value``), differently
named (``w1/w2/w3``, MLA's ``q_a_proj``...) and hybrid (linear-attention, conv) blocks need no
adapter; MoE routers and experts are listed as left out. A registered adapter holds only what
structure cannot tell.

Capture works the same way for every family: each decoder layer's ``forward`` is swapped for a
recorder that stores the keyword arguments the model passes to it (attention mask, rotary
embeddings, ...) and returns its input unchanged (as ``(hidden, None, ...)`` where the model's loop unpacks a
tuple from each layer: see :func:`layer_loop`), so one cheap pass records the per-layer
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

import ast
import contextlib
import dataclasses
import functools
import inspect
import math
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import CalibrationError, UnsupportedModelError
from .offload import execution_device

# The seven projections of a Llama-style decoder block, relative to the block. As ``targets`` (the
# default of PruneConfig) DECODER_PROJ means "the block's own projections": exactly these seven names
# for Llama-style blocks, the discovered ones (see :func:`block_projections`) for any other block.
ATTN_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJ = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DECODER_PROJ = ATTN_PROJ + MLP_PROJ

_TOKEN_ID_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
# Model inputs that mark the visual positions themselves, (B, T), for families whose image positions carry no
# dedicated token id (Kosmos-2's processor writes ordinary vocabulary ids there).
_VISUAL_POSITION_INPUTS = ("image_embeds_position_mask",)
# Floating-point model inputs that are not image data (a float attention mask, ready embeddings of the ids).
_NOT_IMAGE_DATA = ("attention_mask", "inputs_embeds")


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


    def fork(self, hidden: torch.Tensor | None = None) -> "CapturedBatch":
        """A copy to replay on its own: its ``hidden`` (``hidden`` or the same tensor) and its own keyword dicts,
        so the state a layer hands the next (:meth:`Adapter.replay`) is written to this copy only; tensors and
        extras stay shared."""
        return dataclasses.replace(self, hidden=self.hidden if hidden is None else hidden,
                                   layer_kwargs=[dict(kw) for kw in self.layer_kwargs])


def tokens_align(mask_shape: torch.Size, token_shape: torch.Size) -> bool:
    """True when an input's token dimensions hold the (B, T) tokens of a token mask in order, so that its
    flattened rows are the mask's tokens: the same dimensions up to singletons (MLA's (B, 1, T, d) latents),
    or every token flattened into one dimension (the (B*T, d) input an MoE block hands its shared experts)."""
    mask, tokens = [d for d in mask_shape if d != 1], [d for d in token_shape if d != 1]
    return tokens == mask or tokens == [math.prod(mask)]


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


def _takes_image_inputs(model: nn.Module) -> bool:
    """True when the model's forward names an image input (``pixel_values``, ``image_patches``, ``flattened_patches``
    ...)."""
    names = inspect.signature(model.forward).parameters
    return any(word in name for name in names for word in ("pixel", "image", "patches"))


def _holds_floats(obj: Any) -> bool:
    """True when a floating-point tensor sits anywhere inside nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.is_floating_point()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return isinstance(obj, (list, tuple)) and any(_holds_floats(v) for v in obj)


class Adapter:
    """Default behaviour, right for most families; subclasses override what differs."""

    name: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()
    # layer arguments the model's loop rebuilds between layers and this adapter's replay rebuilds the same way
    rebuilds: ClassVar[tuple[str, ...]] = ()
    # False: the engine leaves a block's MoE experts alone (the MoT probe's adapter when the experts stay shared)
    prunes_experts: bool = True

    # -- structure -------------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder module whose forward runs the layers."""
        return model.get_decoder()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def projections(self, model: nn.Module, index: int) -> "BlockProjections":
        """The prunable projections of decoder layer ``index`` (and what was left out, with why)."""
        return block_projections(self.decoder_layers(model)[index])

    def expert_weights(self, model: nn.Module) -> list[str]:
        """'<layer index>.<name>' of every MoE expert weight the projections leave out (not pruned)."""
        return [f"{i}.{name}" for i in range(len(self.decoder_layers(model)))
                for name, why in self.projections(model, i).skipped.items() if "expert" in why.lower()]

    def named_linears(self, model: nn.Module, index: int,
                      names: tuple[str, ...] = DECODER_PROJ) -> dict[str, nn.Linear]:
        """The Linears ``names`` (relative to the block) of decoder layer ``index``; the default
        (DECODER_PROJ) stands for every prunable projection of the block, in discovery order."""
        layer = self.decoder_layers(model)[index]
        if tuple(names) == DECODER_PROJ:
            names = self.projections(model, index).names
        found = {}
        for name in names:
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                valid = [n for n, m in layer.named_modules() if n and _is_linear_like(m)]
                raise UnsupportedModelError(f"target {name!r} is not a module of decoder layer {index}; valid "
                                            f"targets: {valid}") from None
            if not _is_linear_like(module):
                raise UnsupportedModelError(f"{name} of decoder layer {index} is a {type(module).__name__}, "
                                            "not nn.Linear")
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

    def visual_mask_of(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """(B, T) bool mask of a batch of model inputs, True at its visual positions: the image/video token ids
        of ``input_ids``, and the positions an input marks itself (Kosmos-2's ``image_embeds_position_mask``)."""
        input_ids = inputs["input_ids"]
        mask = self.visual_mask(model, input_ids)
        for name in _VISUAL_POSITION_INPUTS:
            marked = inputs.get(name)
            if marked is None:
                continue
            if tuple(marked.shape) != tuple(input_ids.shape):
                raise CalibrationError(f"input {name!r} has shape {tuple(marked.shape)}, input_ids "
                                       f"{tuple(input_ids.shape)}; it must mark the visual positions of input_ids")
            mask = mask | marked.to(device=mask.device, dtype=torch.bool)
        return mask

    def check_image_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """CalibrationError when ``inputs`` mark visual positions but carry no image data. Image data reaches a
        model as floating-point inputs (``pixel_values``, ``flattened_patches``, ``image_embeds``...), the other
        inputs are integer or bool; without any, the placeholders would enter the statistics as if they were
        image features (or the forward fails deep inside). A model whose forward takes no image input (a text
        model with placeholder positions marked visual) has no image data to miss. A family whose image data is
        not floating point overrides this."""
        if not _takes_image_inputs(model):
            return
        n_visual = int(self.visual_mask_of(model, inputs).sum())
        data = [value for name, value in inputs.items() if name not in _NOT_IMAGE_DATA]
        if n_visual and not _holds_floats(data):
            raise CalibrationError(
                f"calibration batch has {n_visual} image/video token positions (ids {self.visual_token_ids(model)}) "
                f"but no image features (no floating-point input among {sorted(inputs)}); pass the processor's "
                "pixel_values with the batch, or remove the image tokens to calibrate on text")

    # -- mixture of experts ------------------------------------------------------------------
    def expert_tokens(self, layer_kwargs: Mapping[str, Any], name: str, shape: torch.Size) -> torch.Tensor | None:
        """(B, T) bool mask (``shape``) of the tokens that experts module ``name`` (block-relative) reads, in (B, T)
        order, when its decoder layer runs with ``layer_kwargs``; None: every token (the usual MoE block)."""
        return None

    def modality_experts(self, names: Iterable[str]) -> dict[str, str]:
        """Of a block's experts modules ``names`` (block-relative), those that only ever read one modality's tokens ->
        that pathway ('text' / 'visual'): the MoT probe gives each to its pathway instead of routing it. None by
        default."""
        return {}

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
        only; the last one stops the forward before the final norm and the LM head. UnsupportedModelError when the
        model's layer loop rebuilds a layer argument from later layers' hidden states (:func:`layer_loop`).
        """
        if "input_ids" not in inputs:
            raise CalibrationError("calibration inputs need 'input_ids' (to locate visual tokens); got keys "
                                   f"{sorted(inputs)}")
        self.check_image_inputs(model, inputs)
        layers = self.decoder_layers(model)
        loop = layer_loop(self.language_model(model), layers)
        recorded: list[dict[str, Any] | None] = [None] * len(layers)
        first: dict[str, torch.Tensor] = {}
        extras: dict[str, Any] = {}

        def recorder(index: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if len(args) > 1:
                    kwargs = _as_keywords(layers[index], index, args, kwargs)
                if index == 0:
                    first["hidden"] = hidden
                recorded[index] = kwargs
                if index == len(layers) - 1:
                    raise _CaptureDone
                # what the layer returns, in structure: the loop unpacks (hidden, *state) from some layers' calls
                return hidden if loop.arity is None else (hidden,) + (None,) * (loop.arity - 1)
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
        _check_rebuilt(model, loop, recorded, self.rebuilds)
        input_ids = inputs["input_ids"]
        if tuple(first["hidden"].shape[:2]) != tuple(input_ids.shape):
            raise UnsupportedModelError(
                f"{type(model).__name__}: its decoder runs on {tuple(first['hidden'].shape[:2])} positions, input_ids "
                f"has {tuple(input_ids.shape)}; the model adds positions that have no input id (e.g. image features "
                "prepended to the text), so visual and padding positions cannot be read from input_ids")
        mask = inputs.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        return CapturedBatch(first["hidden"], recorded, self.visual_mask_of(model, inputs), valid, extras)

    def replay(self, model: nn.Module, index: int, hidden: torch.Tensor, batch: CapturedBatch,
               layer: nn.Module | None = None) -> torch.Tensor:
        """Run decoder layer ``index`` (or ``layer``, e.g. an offloaded copy) on ``hidden`` as the model would."""
        layer = self.decoder_layers(model)[index] if layer is None else layer
        kwargs = batch.layer_kwargs[index]
        try:
            out = layer(hidden, **kwargs)
        except (ValueError, TypeError, AttributeError) as error:
            self._explain_carried(model, index, kwargs, error)
            raise
        if isinstance(out, tuple):
            self._carry(model, index, out, batch)
        out = out[0] if isinstance(out, tuple) else out
        return self.after_layer(model, index, out, batch.extras)

    def carried(self, model: nn.Module) -> dict[str, int]:
        """Keyword of a decoder layer's call -> the position of the previous layer's output it receives (state the
        model's loop hands from layer to layer, e.g. a sparse-attention indexer's top-k); read from the loop."""
        return layer_loop(self.language_model(model), self.decoder_layers(model)).carried

    def handed_on(self, model: nn.Module) -> tuple[str, ...]:
        """Layer arguments a replay writes into the batch for the layers after it (:meth:`carried`,
        :attr:`rebuilds`)."""
        return tuple(self.carried(model)) + tuple(self.rebuilds)

    def _carry(self, model: nn.Module, index: int, out: tuple, batch: CapturedBatch) -> None:
        """Hand layer ``index``'s state outputs to the next layer's keywords in ``batch``, as the model's loop does:
        the replay of layer ``index + 1`` then reads what this replay of layer ``index`` computed."""
        if index + 1 < len(batch.layer_kwargs):
            for name, position in self.carried(model).items():
                batch.layer_kwargs[index + 1][name] = out[position]

    def _explain_carried(self, model: nn.Module, index: int, kwargs: Mapping[str, Any], error: Exception) -> None:
        """UnsupportedModelError (from ``error``) when layer ``index`` failed while reading state that the model hands
        it from the previous layer's output (e.g. a "shared" sparse-attention indexer reusing the previous layer's
        top-k) and that state is missing: this replay did not run layer ``index - 1`` on the batch first."""
        missing = [name for name in self.carried(model) if index > 0 and kwargs.get(name) is None]
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', None)!r}): decoder layer "
                f"{index} reads {missing[0]!r} from the previous layer's output (e.g. a \"shared\" sparse-attention "
                f"indexer reusing its top-k), and layer {index - 1} was not replayed on this batch first: replay the "
                f"layers in order from layer 0, or from a fork of a batch whose replay ran them ({error})") from error

    # -- after the last layer --------------------------------------------------------------
    def final_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules the language model applies, in order, to the last decoder layer's output: its final norm,
        and before it, in multi-stream (hyper-connection) models, the step that reduces the streams to one.

        Found in the language model's forward: the child modules it calls after its loop over the decoder layers
        (:func:`calls_after_layers`); where that source cannot be read, the final norm by its name.
        UnsupportedModelError when a module called there reads more than the hidden states (earlier layers' states)."""
        language_model = self.language_model(model)
        calls = calls_after_layers(language_model, self.decoder_layers(model)) or []
        called = [(name, n) for name, n in calls if isinstance(getattr(language_model, name, None), nn.Module)]
        wider = [name for name, n in called if n != 1]
        if wider:
            raise UnsupportedModelError(
                f"{type(language_model).__name__} calls {wider[0]} after its decoder layers with more than their "
                "output: what follows the last layer reads more than its output, so logits cannot be computed from it")
        return [getattr(language_model, name) for name, _ in called] or [self.final_norm(model)]

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm the language model applies to the last decoder layer's output, found by its name."""
        language_model = self.language_model(model)
        for name in _FINAL_NORMS:
            module = getattr(language_model, name, None)
            if isinstance(module, nn.Module):
                return module
        raise UnsupportedModelError(
            f"{type(language_model).__name__} has no final norm named {'/'.join(_FINAL_NORMS)}; register an Adapter "
            "whose final_norm returns it")

    def after_head(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to the LM head's outputs, from its text config: Granite's division by
        ``logits_scaling``, Gemma-style soft-capping ``cap * tanh(logits / cap)`` by ``final_logit_softcapping``
        (every transformers model whose config holds either applies it, in this arithmetic), and Cohere's product
        with ``logit_scale`` where the model's forward reads it (Aya Vision from transformers 5.25 on; Cohere2
        Vision holds the field but does not apply it)."""
        text = model.config.get_text_config()
        if getattr(text, "logit_scale", None) is not None and _forward_reads(type(model), "logit_scale"):
            logits = logits * text.logit_scale
        scaling = getattr(text, "logits_scaling", None)
        if scaling is not None:
            logits = logits / scaling
        cap = getattr(text, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the model makes of the last decoder layer's outputs ``hidden`` (B, T, *state), state (C,) or, with
        hyper-connections, the streams ((N, C) or (N * C,)): :meth:`final_modules`, the LM head, :meth:`after_head`
        -> (B, T, V). Positions are independent here, so any subset of positions can be passed as (1, S, *state)."""
        for module in self.final_modules(model):
            hidden = module(hidden.to(execution_device(module)))
        head = model.get_output_embeddings()
        return self.after_head(model, head(hidden.to(execution_device(head))))


def calls_after_layers(language_model: nn.Module, layers: nn.ModuleList) -> list[tuple[str, int]] | None:
    """(name, number of arguments) of every ``self.<name>(...)`` call that ``language_model``'s forward makes after its
    loop over ``layers``, in the order they run (inner calls first); None when the forward's source cannot be read or
    holds no loop over ``layers``. Attributes that are not modules are listed too (the caller keeps the modules)."""
    attribute = next((name for name, child in language_model.named_children() if child is layers), None)
    calls = None if attribute is None else _calls_after_loop(type(language_model), attribute)
    return None if calls is None else list(calls)


@functools.lru_cache(maxsize=None)
def _forward_tree(cls: type) -> ast.AST | None:
    """The syntax tree of ``cls.forward``, parsed once; None when its source cannot be read."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None


def _forward_reads(cls: type, name: str) -> bool:
    """Whether ``cls.forward`` reads an attribute called ``name`` (of anything: ``self.config.x.name``)."""
    tree = _forward_tree(cls)
    return tree is not None and any(isinstance(node, ast.Attribute) and node.attr == name for node in ast.walk(tree))


@functools.lru_cache(maxsize=None)
def _calls_after_loop(cls: type, attribute: str) -> tuple[tuple[str, int], ...] | None:
    """:func:`calls_after_layers` for the forward of class ``cls`` and its loop over ``self.<attribute>``, read once."""
    tree = _forward_tree(cls)
    if tree is None:
        return None
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.For) and _reads_self(node.iter, attribute)]
    if not loops:
        return None
    end = max(loop.end_lineno for loop in loops)
    calls: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:  # children first: the order in which nested calls run
        for child in ast.iter_child_nodes(node):
            visit(child)
        if isinstance(node, ast.Call) and node.lineno > end and _reads_self(node.func, None, direct=True):
            calls.append((node.func.attr, len(node.args) + len(node.keywords)))

    visit(tree)
    return tuple(calls)


@dataclass(frozen=True)
class LayerLoop:
    """What a language model's loop over its decoder layers does around each layer's call, read from its source.

    arity: how many names the loop unpacks each call's result into ((hidden, state...)), None: not unpacked.
    carried: keyword of the call -> the position of the previous call's result it receives (state between layers).
    rebuilt: keywords of the call whose values the loop rebuilds from the hidden states (e.g. block residuals).
    """

    arity: int | None = None
    carried: dict[str, int] = field(default_factory=dict)
    rebuilt: tuple[str, ...] = ()


def layer_loop(language_model: nn.Module, layers: nn.ModuleList) -> LayerLoop:
    """The :class:`LayerLoop` of ``language_model``'s forward; the default (nothing between layers) when its source
    cannot be read or its loop over ``layers`` cannot be found."""
    attribute = next((name for name, child in language_model.named_children() if child is layers), None)
    loop = None if attribute is None else _layer_loop(type(language_model), attribute, type(layers[0]))
    return LayerLoop() if loop is None else loop


@functools.lru_cache(maxsize=None)
def _layer_loop(cls: type, attribute: str, layer_cls: type) -> LayerLoop | None:
    """:func:`layer_loop` for the forward of class ``cls``, its loop over ``self.<attribute>`` of ``layer_cls``."""
    tree = _forward_tree(cls)
    if tree is None:
        return None
    for loop in (node for node in ast.walk(tree) if isinstance(node, ast.For) and _reads_self(node.iter, attribute)):
        call = _layer_call(loop, attribute)
        if call is not None:
            return _read_loop(loop, call, layer_cls)
    return None


def _layer_call(loop: ast.For, attribute: str) -> ast.Call | None:
    """The call of a decoder layer in ``loop``: of the loop variable, or of ``self.<attribute>[...]``."""
    bound = {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
    for node in ast.walk(loop):
        if isinstance(node, ast.Call) and node.args and (
                (isinstance(node.func, ast.Name) and node.func.id in bound)
                or (isinstance(node.func, ast.Subscript) and _reads_self(node.func.value, attribute, direct=True))):
            return node
    return None


def _read_loop(loop: ast.For, call: ast.Call, layer_cls: type) -> LayerLoop:
    hidden = call.args[0].id if isinstance(call.args[0], ast.Name) else None
    unpacked: list[str] = []
    outputs: set[str] = set()
    for node in ast.walk(loop):
        if isinstance(node, ast.Assign) and node.value is call:
            target = node.targets[0]
            if isinstance(target, ast.Tuple):
                unpacked = [t.id if isinstance(t, ast.Name) else "" for t in target.elts]
            outputs |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    params = [p.name for p in inspect.signature(layer_cls.forward).parameters.values()][2:]  # after self, hidden
    passed = {params[i]: arg.id for i, arg in enumerate(call.args[1:])
              if i < len(params) and isinstance(arg, ast.Name)}
    passed.update({kw.arg: kw.value.id for kw in call.keywords if kw.arg and isinstance(kw.value, ast.Name)})
    layer_states = outputs | ({hidden} if hidden else set())
    carried = {key: unpacked.index(name) for key, name in passed.items() if name in unpacked[1:]}
    rebuilt = tuple(key for key, name in passed.items() if key not in carried and name not in layer_states
                    and _assigned_from(loop, name, layer_states))
    return LayerLoop(len(unpacked) or None, carried, rebuilt)


def _assigned_from(loop: ast.For, name: str, sources: set[str]) -> bool:
    """``loop`` assigns ``name`` a value that reads one of ``sources``."""
    for node in ast.walk(loop):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t)) and any(
                    isinstance(n, ast.Name) and n.id in sources for n in ast.walk(node.value)):
                return True
    return False


def _check_rebuilt(model: nn.Module, loop: LayerLoop, recorded: list[dict[str, Any]],
                   handled: tuple[str, ...] = ()) -> None:
    """UnsupportedModelError when the loop rebuilt an argument from the hidden states after a layer past the first:
    capture's recorders return their input, so that value (and, after pruning, the replayed one) would be wrong.
    An update after layer 0 alone reads what capture holds exactly (layer 0's input) and is checked by replay."""
    for name in (n for n in loop.rebuilt if n not in handled):
        changed = [i for i in range(2, len(recorded)) if recorded[i].get(name) is not recorded[i - 1].get(name)]
        if changed:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', None)!r}): its loop over the "
                f"decoder layers rebuilds the argument {name!r} of layer {changed[0]} from the hidden states of "
                "earlier layers (e.g. block attention residuals over several residual blocks); the layer-by-layer "
                "replay does not carry state between layers, so it cannot reproduce this model")


def _reads_self(node: ast.AST, attribute: str | None, direct: bool = False) -> bool:
    """``node`` is (``direct``) or contains an expression ``self.<attribute>`` (any attribute when None)."""
    nodes = [node] if direct else list(ast.walk(node))
    return any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
               and (attribute is None or n.attr == attribute) for n in nodes)


def _as_keywords(layer: nn.Module, index: int, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The positional arguments after hidden_states (e.g. Gemma4's per-layer input) as keywords, named by
    the layer's forward signature, so that replay can pass them by name."""
    names = [p.name for p in inspect.signature(type(layer).forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][2:len(args) + 1]  # after self, hidden
    if len(names) != len(args) - 1 or any(n in kwargs for n in names):
        raise UnsupportedModelError(
            f"decoder layer {index} ({type(layer).__name__}) was called with {len(args)} positional arguments "
            "that its forward signature does not name; register an Adapter that captures them")
    return {**dict(zip(names, args[1:])), **kwargs}


# Names of the norm a language model applies after its last decoder layer: most of transformers' models use the
# first; Kosmos-2 calls it layer_norm, LFM2 embedding_norm (applied at the end of its forward).
_FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "layer_norm", "embedding_norm")

_REGISTRY: dict[str, Adapter] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter of every ``model_type`` it lists.

    Args:
        cls: an :class:`Adapter` subclass with ``model_types``.

    Returns:
        ``cls`` unchanged (an instance is registered).
    """
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

    def record_extras(self, model: nn.Module, extras: dict[str, Any]) -> contextlib.AbstractContextManager:
        return _recording_deepstack(self.language_model(model), extras)

    def after_layer(self, model: nn.Module, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        return _add_deepstack(self.language_model(model), index, hidden, extras)


def _recording_deepstack(language_model: nn.Module, extras: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Record the DeepStack visual features and their positions the model hands its language model."""
    return _recording_kwargs(language_model, extras, ("visual_pos_masks", "deepstack_visual_embeds"))


@contextlib.contextmanager
def _recording_kwargs(module: nn.Module, extras: dict[str, Any], names: tuple[str, ...]) -> Iterator[None]:
    """Record the keyword arguments ``names`` of ``module``'s forward call into ``extras``."""
    def hook(_module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        extras.update({name: kwargs.get(name) for name in names})

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _add_deepstack(language_model: nn.Module, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
    """What DeepStack adds to the hidden states after layer ``index`` (nothing past its last feature level)."""
    embeds = extras.get("deepstack_visual_embeds")
    if embeds is None or index >= len(embeds):
        return hidden
    return language_model._deepstack_process(hidden, extras["visual_pos_masks"], embeds[index])


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
    """Fallback for unregistered families: decoder blocks and projections found by structure
    (see :func:`find_decoder_layers` and :func:`block_projections`)."""

    name = "generic"

    def __init__(self) -> None:
        self._found: dict[int, tuple[str, nn.ModuleList]] = {}  # id(model) -> what discovery found
        self._verified: set[int] = set()  # id(model) of models whose replay was checked once

    def capture(self, model: nn.Module, inputs: dict[str, Any]) -> CapturedBatch:
        """As for every adapter; the first capture of a model also checks that the layer-by-layer replay
        reproduces the model's own forward (:func:`check_replay`), since nothing registered vouches for it."""
        batch = super().capture(model, inputs)
        if id(model) not in self._verified:
            check_replay(self, model, inputs, batch)
            self._verified.add(id(model))
        return batch

    def _discovered(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """Discovery runs once per model; the engine asks for the layers once per layer and batch."""
        cached = self._found.get(id(model))
        if cached is None or model.get_submodule(cached[0]) is not cached[1]:
            cached = self._found[id(model)] = find_decoder_layers(model)
        return cached

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._discovered(model)[1]

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self._discovered(model)[0].rpartition(".")[0])

    # Between-layer work found by structure: a language model with DeepStack (Qwen3-VL-MoE,
    # Qwen3-Omni, ...) adds visual features after its first layers, as Qwen3-VL does.
    def record_extras(self, model: nn.Module, extras: dict[str, Any]) -> contextlib.AbstractContextManager:
        language_model = self.language_model(model)
        if hasattr(language_model, "_deepstack_process"):
            return _recording_deepstack(language_model, extras)
        return super().record_extras(model, extras)

    def after_layer(self, model: nn.Module, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        return _add_deepstack(self.language_model(model), index, hidden, extras)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        for name in ("self_attn", "attention", "attn", "self_attention"):
            if isinstance(getattr(layer, name, None), nn.Module):
                return getattr(layer, name)
        raise UnsupportedModelError(f"{type(layer).__name__} has no self-attention module named "
                                    "self_attn/attention/attn/self_attention; the tamp pool needs one")


@register_adapter
class Granite4VisionAdapter(GenericAdapter):
    """Granite 4 Vision: its language model adds projected vision features to the image positions *before*
    the decoder layers named by its ``deepstack_features`` dict (decoder layer index -> (n_image, C)); the
    additions before layers 1.. happen between layers and are re-applied after the previous layer.
    Structure cannot tell this forward-loop code apart, hence a registered entry (blocks still found by
    structure, replay still checked)."""

    name = "granite4_vision"
    model_types = ("granite4_vision",)

    def record_extras(self, model: nn.Module, extras: dict[str, Any]) -> contextlib.AbstractContextManager:
        return _recording_kwargs(self.language_model(model), extras, ("deepstack_features", "vision_mask"))

    def after_layer(self, model: nn.Module, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        features = (extras.get("deepstack_features") or {}).get(index + 1)
        if features is None:
            return hidden
        # the language model's own expression: (B, T, 1) mask, features added in token order
        mask = extras["vision_mask"].to(hidden.device)
        features = features.to(hidden.device, hidden.dtype)
        return hidden.masked_scatter(mask, (hidden[mask.squeeze(-1)] + features).view(-1))


@register_adapter
class Inkling2Adapter(GenericAdapter):
    """Inkling-2: every decoder layer also reads ``block_states``, the stacked inputs of the block-boundary layers
    before it (block attention residuals), which the model's loop grows after each boundary layer; the replay grows
    it the same way, from the inputs it replays (blocks still found by structure, replay still checked). What
    follows the last layer mixes ``block_states`` in as well, so logits are not computed from the last output."""

    name = "inkling2"
    model_types = ("inkling2", "inkling2_text")
    rebuilds = ("block_states",)

    def replay(self, model: nn.Module, index: int, hidden: torch.Tensor, batch: CapturedBatch,
               layer: nn.Module | None = None) -> torch.Tensor:
        out = super().replay(model, index, hidden, batch, layer)
        if self.decoder_layers(model)[index].is_block_boundary:  # the loop's own rule, after the layer's call
            states = batch.layer_kwargs[index]["block_states"]
            grown = torch.cat([states.to(hidden.device), hidden.unsqueeze(-2)], dim=-2)
            for kwargs in batch.layer_kwargs[index + 1:]:
                kwargs["block_states"] = grown
        return out


@register_adapter
class MuseAdapter(GenericAdapter):
    """Muse Spark and Muse Glimmer: their forward multiplies the LM head's outputs by the text config's
    ``output_multiplier`` before the soft-cap; that field also scales the MoE router's logits, so its name alone
    does not say that the logits are scaled, hence a registered entry (blocks still found by structure)."""

    name = "muse"
    model_types = ("muse_spark", "muse_glimmer")

    def after_head(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return super().after_head(model, logits * model.config.get_text_config().output_multiplier)


@register_adapter
class ChameleonAdapter(GenericAdapter):
    """Chameleon: its forward sets the logits of the image-code vocabulary (the VQ tokens, begin/end-image markers
    excepted) to the lowest float, so that text generation never samples them; the ids come from the model's
    vocabulary mapping (blocks still found by structure)."""

    name = "chameleon"
    model_types = ("chameleon",)

    def after_head(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        logits = super().after_head(model, logits)
        logits[..., self.language_model(model).vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
        return logits


# Replay may differ from the forward by float noise at most (kernels that reduce in another order).
REPLAY_TOLERANCE = 1e-3  # of the largest magnitude of the last layer's output


@register_adapter
class Ernie45VLMoeAdapter(GenericAdapter):
    """ERNIE 4.5 VL MoE: an MoE layer holds a text and a vision expert set (``mlp.text_moe`` / ``mlp.vision_moe``), each
    run on the tokens ``moe_mm_token_type_ids`` assigns it (non-zero: vision, image markers included), gathered in
    (B, T) order; without vision-typed tokens the text set reads every token. Structure cannot tell which set is
    which, nor which tokens each reads."""

    name = "ernie4_5_vl_moe"
    model_types = ("ernie4_5_vl_moe",)
    _SETS = {"text_moe": "text", "vision_moe": "visual"}  # expert set -> the pathway whose tokens it reads

    def _set_of(self, name: str) -> str | None:
        return next((path for part, path in self._SETS.items() if part in name.split(".")), None)

    def expert_tokens(self, layer_kwargs: Mapping[str, Any], name: str, shape: torch.Size) -> torch.Tensor | None:
        path = self._set_of(name)
        types = layer_kwargs.get("moe_mm_token_type_ids")
        if path is None or types is None or not bool(types.any()):  # the text set reads every token (or no set)
            return None if path != "visual" else torch.zeros(shape, dtype=torch.bool)
        vision = types.bool()
        return vision if path == "visual" else ~vision

    def modality_experts(self, names: Iterable[str]) -> dict[str, str]:
        return {name: path for name in names if (path := self._set_of(name)) is not None}


@torch.no_grad()
def check_replay(adapter: Adapter, model: nn.Module, inputs: dict[str, Any], batch: CapturedBatch) -> None:
    """Raise UnsupportedModelError when replaying ``batch`` layer by layer does not reproduce the last
    decoder layer's output in the model's own forward (then the model does work between its layers
    that ``adapter`` does not know, and pruning statistics would come from a different computation)."""
    last = len(adapter.decoder_layers(model)) - 1
    found: dict[str, torch.Tensor] = {}
    handle = adapter.decoder_layers(model)[last].register_forward_hook(
        lambda _m, _a, out: found.update(out=out[0] if isinstance(out, tuple) else out))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    want = adapter.after_layer(model, last, found["out"], batch.extras)
    run = batch.fork()  # the state layers hand on is written to the copy: the captured batch stays as recorded
    got = run.hidden
    for i in range(last + 1):
        got = adapter.replay(model, i, got, run)
    error, scale = float((got - want).abs().max()), float(want.abs().max())
    if error > REPLAY_TOLERANCE * scale:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', None)!r}): replaying its "
            f"decoder layers one by one differs from its forward by {error:.3g} (output scale {scale:.3g}); it does "
            "work between layers that the generic adapter does not know. Register an Adapter whose record_extras/"
            "after_layer reproduce it.")


# -- structural discovery ------------------------------------------------------------------------
# Dotted-name parts that mark modules outside the language decoder (vision tower, projector, resampler,
# image tokenizer): decoder blocks are never searched for below them.
_NOT_DECODER = ("vision", "visual", "image", "encoder", "resampler", "perceiver", "connector", "projector",
                "vqmodel", "vqvae", "audio")
# Names the MoE routers of transformers' models use (a router's Linear is not a projection of the tokens).
_ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "gating")


@dataclass(frozen=True)
class BlockProjections:
    """What a decoder block holds that pruning could touch.

    names: the prunable projections (Linear-like, relative to the block) in registration order.
    skipped: relative name -> why it is left out (MoE routers, expert weights, ...).
    """

    names: tuple[str, ...]
    skipped: dict[str, str]


def text_config(model: nn.Module) -> Any:
    """The language model's config (the model's own config for text-only models)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _outside_decoder(name: str) -> bool:
    return any(word in part for part in name.lower().split(".") for word in _NOT_DECODER)


def _decoder_root(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of ``model.get_decoder()`` when it resolves, else the whole model."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        decoder = None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder and decoder is not model:
            return name, module
    return "", model


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, list) of the language decoder's blocks, found by structure.

    The blocks are the one ModuleList below ``model.get_decoder()`` (else anywhere outside the vision
    tower, projector and resampler) whose every entry holds Linear-like projections and whose length
    equals the text config's ``num_hidden_layers`` when the config gives one.
    Raises UnsupportedModelError naming the candidates when there is not exactly one.
    """
    n_layers = getattr(text_config(model), "num_hidden_layers", None)
    root_name, root = _decoder_root(model)
    for scope_name, scope in ((root_name, root), ("", model)):
        candidates = [
            (_join(scope_name, name), module) for name, module in scope.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) > 0 and not _outside_decoder(name)
            and (not isinstance(n_layers, int) or len(module) == n_layers)
            and all(block_projections(block).names for block in module)
        ]
        if len(candidates) == 1:
            candidates += _same_blocks_elsewhere(model, *candidates[0])
            if len(candidates) == 1:
                return candidates[0]
        if candidates or scope is model:
            break
    raise UnsupportedModelError(
        f"cannot decide which module list holds the decoder layers of {type(model).__name__} "
        f"(config.model_type={getattr(model.config, 'model_type', None)!r}, num_hidden_layers={n_layers}); "
        f"{_why_undecided(model, [name for name, _ in candidates], n_layers)}. Register an Adapter subclass for "
        "this family with @register_adapter.")


def _why_undecided(model: nn.Module, found: list[str], n_layers: Any) -> str:
    """The obstacle in words: several block lists (which one is the decoder, and the others run between its
    layers?), or none outside the parts whose names mark them as vision towers or encoders."""
    if found:
        return (f"candidates: {found} (several lists of blocks with projections, e.g. decoder layers interleaved "
                "with cross-attention layers: the replay would have to run the others between the layers)")
    hidden = [name for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) > 0 and _outside_decoder(name)
              and (not isinstance(n_layers, int) or len(module) == n_layers)
              and all(block_projections(block).names for block in module)]
    if hidden:
        return (f"candidates: none outside the parts named as vision towers or encoders, which hold {hidden} "
                "(a decoder stack under an encoder-named module, as BERT-style text decoders have, is not searched)")
    return "candidates: none"


def _same_blocks_elsewhere(model: nn.Module, chosen: str, layers: nn.ModuleList) -> list[tuple[str, nn.ModuleList]]:
    """Other module lists (outside the vision parts) holding blocks of the chosen blocks' class: a second
    decoder-like stack makes the choice ambiguous."""
    kind = type(layers[0])
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and module is not layers and name != chosen and len(module) > 0
            and not _outside_decoder(name) and all(isinstance(block, kind) for block in module)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def block_projections(block: nn.Module) -> BlockProjections:
    """Every Linear-like module of ``block`` (a projection of the tokens), found by structure.

    Left out, and named in ``skipped``: MoE routers and expert weights (3-D parameters or per-expert
    Linears: their statistics need the router's dispatch, a later step) and convolutions of hybrid
    token mixers. Norms and embeddings are not Linear-like and never listed. A Linear-like module is
    a leaf: the probe's routed Linear counts as the Linear it wraps.
    """
    names: list[str] = []
    skipped: dict[str, str] = {}
    _walk(block, "", names, skipped)
    return BlockProjections(tuple(names), skipped)


def _walk(module: nn.Module, prefix: str, names: list[str], skipped: dict[str, str]) -> None:
    is_moe = _holds_experts(module)
    for child_name, child in module.named_children():
        name = _join(prefix, child_name)
        if is_moe and child_name == "experts":
            skipped[name] = "MoE experts (not a Linear: pruned per expert from its routed tokens by pruning.experts)"
        elif is_moe and child_name in _ROUTER_NAMES:
            skipped[name] = "MoE router"
        elif _is_linear_like(child):
            names.append(name)
        elif isinstance(child, nn.modules.conv._ConvNd):
            skipped[name] = "convolution (a token mixer's conv, not a Linear)"
        elif isinstance(child, nn.Embedding):
            continue
        else:
            _walk(child, name, names, skipped)
    for param_name, param in module.named_parameters(recurse=False):
        if param.dim() == 3:
            skipped[_join(prefix, param_name)] = "3-D expert weights (not a Linear: see pruning.experts)"


def _holds_experts(module: nn.Module) -> bool:
    """An MoE block: it has an ``experts`` child (a ModuleList of experts or a module of 3-D weights)."""
    return isinstance(getattr(module, "experts", None), nn.Module)


def _is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear, or a module standing in for one (e.g. the probe's routed Linear)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "in_features")


# Deprecated: an adapter stored on the model under this attribute. Pass the adapter to the function that needs it
# instead (``prune_(model, config, batches, adapter=...)``); get_adapter still reads it, with a DeprecationWarning.
ATTACHED_ADAPTER = "_atv_adapter"


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter registered for ``model.config.model_type``, else the introspecting fallback (structural
    discovery). An adapter other than the model's own (the MoT probe's, which routes) is passed to the functions
    that take one (``adapter=``), not looked up here.

    Args:
        model: a Hugging Face model.

    Returns:
        The adapter that finds the model's decoder layers, projections and visual tokens.

    Raises:
        UnsupportedModelError: when no adapter can locate the decoder layers (the message names the model
            type and the obstacle).
    """
    attached = getattr(model, ATTACHED_ADAPTER, None)
    if attached is not None:
        warnings.warn(f"an adapter stored on the model as {ATTACHED_ADAPTER!r} is deprecated: pass it as adapter= to "
                      "the function that uses it (e.g. prune_(model, config, batches, adapter=...))",
                      DeprecationWarning, stacklevel=2)
        return attached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = _REGISTRY.get(model_type)
    if adapter is not None:
        return adapter
    check_in_scope(model)
    adapter = GenericAdapter()
    adapter.decoder_layers(model)  # raises a clear error when it cannot decide
    return adapter


def check_in_scope(model: nn.Module) -> None:
    """Raise UnsupportedModelError for models this toolkit cannot prune layer by layer: encoder-decoder
    language models and models whose decoder (``get_decoder()``) takes ``decoder_input_ids`` (their decoder reads
    encoder states the replay does not capture), and models without a causal LM head."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(text_config(model), "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) has an encoder-decoder language model; "
            "only decoder-only language models are supported")
    root_name, root = _decoder_root(model)
    if root is not model and "decoder_input_ids" in inspect.signature(type(root).forward).parameters:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}): its decoder {root_name} takes decoder_input_ids and "
            "reads what an encoder pass produced (hidden states or a KV cache, e.g. block diffusion), which a "
            "layer-by-layer replay does not capture; only decoder-only language models are supported")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedModelError(f"model_type {model_type!r} ({type(model).__name__}) {_headless_reason(model)}")


def _headless_reason(model: nn.Module) -> str:
    """Why a model that exposes no LM head (``get_output_embeddings()`` is None) cannot be pruned here, from its
    structure: a text decoder that reads the image through cross-attention, a model that predicts something
    other than tokens, or a base class loaded where the class with the head exists."""
    from transformers.models.auto import modeling_auto

    crossing = next((name for name, module in model.named_modules() if module is not model and
                     "encoder_hidden_states" in inspect.signature(type(module).forward).parameters), None)
    if crossing is not None:
        return (f"has a text decoder ({crossing}) that reads the image through cross-attention "
                "(encoder_hidden_states), not as image tokens of its sequence, so it has neither a visual pathway "
                "for ATV's pools and the MoT probe nor the decoder-only layer stack the replay prunes; only "
                "decoder-only LVLMs are supported")
    inner = next((name for name, module in model.named_modules() if module is not model
                  and callable(getattr(module, "get_output_embeddings", None))
                  and module.get_output_embeddings() is not None), None)
    if inner is not None:
        return (f"exposes no causal LM head (get_output_embeddings() is None) although its {inner} has one: the "
                "toolkit finds the head through that call, so this family needs a registered adapter that "
                "says where its head is (see the guide 'Study a new LVLM')")
    headed = {name for mapping in (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                                   modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) for name in mapping.values()}
    if type(model).__name__ in headed:
        outputs = ", ".join(name for name, _ in model.named_children())
        return (f"has no causal LM head (get_output_embeddings() is None): its forward returns no next-token "
                f"logits (its top-level modules: {outputs}), e.g. robot actions "
                "or embeddings, and calibration, the probe and evaluation all score next-token logits; only LVLMs "
                "that generate text are supported")
    return ("has no causal LM head (get_output_embeddings() is None); load it with AutoModelForImageTextToText (or "
            "AutoModelForCausalLM) to get the class with the head")


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)
