"""Model I/O shared by the harness, the lmms-eval bridge and the default-model trainer: the chat prompt,
encoding, device placement, forwards read back per row, greedy generation, and the token-level common prefix.

One place for each, so the harness, the bridge and the trainer build the same prompt and read the same
tokens. The device and float dtype always come from the model's parameters; opening an image is
:func:`pruning.data.open_image` (calibration data uses it too).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from pruning.templates import render_chat


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration; the model's training flag is restored afterwards."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def to_model(inputs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Move tensors to the model's device; floating tensors (pixel values) take its float dtype."""
    params = list(model.parameters())
    device = params[0].device
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def tokenizer_of(processor):
    """The processor's tokenizer (a bare tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


@contextlib.contextmanager
def _padding_side(processor, side: str) -> Iterator[None]:
    tokenizer = tokenizer_of(processor)
    saved, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield
    finally:
        tokenizer.padding_side = saved


def build_prompt(processor, question: str, with_image: bool | int) -> str:
    """The fixed prompt: one user turn (the image(s) first, then the question) and the generation prompt.

    >>> build_prompt(processor, "What colour is the square?", True)  # doctest: +SKIP
    '<|im_start|>user\\n<image>\\nWhat colour is the square?<|im_end|>\\n<|im_start|>assistant\\n'

    Args:
        processor (transformers.ProcessorMixin): the model's processor (its chat template renders the turn).
        question: the question text.
        with_image: whether there is an image, or how many there are (one image item each).

    Returns:
        The prompt text, placeholders included.
    """
    content: list[dict[str, str]] = [{"type": "image"}] * int(with_image)
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    return render_chat(processor, messages, add_generation_prompt=True)


def encode(processor, texts: list[str], images: list[Image.Image] | None, side: str) -> dict[str, torch.Tensor]:
    """Texts (and their images, in order, or none) -> model inputs on the CPU, padded on ``side``."""
    with _padding_side(processor, side):
        if images:
            return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
        return dict(processor(text=texts, padding=True, return_tensors="pt"))


class _StopSequences(StoppingCriteria):
    """Per row: stop once the decoded new tokens contain a stop sequence (the text is cut afterwards).

    Not ``generate(stop_strings=...)``: transformers' ``StopStringCriteria`` matches the end of the whole
    sequence, prompt included (a stop sequence spanning the prompt's last tokens halts generation before
    the answer holds it), and it cannot index every tokenizer's vocabulary (it raises on a WordLevel one).
    """

    def __init__(self, tokenizer, prompt_length: int, until: Sequence[str]):
        self.tokenizer, self.prompt_length, self.until = tokenizer, prompt_length, [s for s in until if s]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        done = [any(s in text for s in self.until) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def greedy_generate(model: nn.Module, processor, prompts: list[str], images: list[Image.Image] | None,
                    max_new_tokens: int, until: Sequence[str] = ()) -> list[str]:
    """Greedy continuations of ``prompts`` (with their images, in order, or none), one left-padded batch: per prompt
    its new text, special tokens dropped, not stripped. With ``until``, a row stops generating once its new text
    holds one of those sequences (the caller cuts the text there). The harness and the lmms-eval bridge both answer
    through this one call."""
    inputs = encode(processor, prompts, images, "left")
    tokenizer = tokenizer_of(processor)
    prompt_length = inputs["input_ids"].shape[1]
    stop = StoppingCriteriaList([_StopSequences(tokenizer, prompt_length, until)]) if until else None
    out = model.generate(**to_model(inputs, model), do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, stopping_criteria=stop)
    return tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)  # (B,) new text


def real_positions(attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """(B, T) mask -> per row the indices of its real (non-padding) tokens, in order."""
    return [row.nonzero().squeeze(-1) for row in attention_mask.cpu()]


def real_ids(inputs: dict[str, torch.Tensor]) -> list[list[int]]:
    """Encoded inputs -> per row its real (non-padding) token ids."""
    return [inputs["input_ids"][b, p].tolist() for b, p in enumerate(real_positions(inputs["attention_mask"]))]


def forward_rows(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward; per row (real token ids (T_b,), their logits (T_b, V)), padding dropped."""
    logits = model(**to_model(inputs, model), use_cache=False).logits  # (B, T, V)
    rows = []
    for b, positions in enumerate(real_positions(inputs["attention_mask"])):
        rows.append((inputs["input_ids"][b, positions], logits[b, positions.to(logits.device)]))
    return rows


def cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of a right-padded batch -> (B,) index of each row's last real token."""
    lengths = attention_mask.sum(1)
    if not torch.equal(attention_mask.bool(), torch.arange(attention_mask.shape[1]) < lengths[:, None]):
        raise ValueError("last_logits needs a right-padded batch (encode(..., side='right'))")
    return lengths - 1


def _logits_at(model: nn.Module, model_inputs: dict[str, Any], positions: torch.Tensor,
               offset: int) -> tuple[torch.Tensor, Any]:
    """One forward; (B, V) logits of row b at ``positions[b]`` (relative to ``offset``, the cached tokens) and the
    returned cache. Only those positions are projected onto the vocabulary where the forward takes
    ``logits_to_keep``."""
    keep = sorted(set((positions - offset).tolist()))
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = torch.tensor(keep, device=model_inputs["input_ids"].device)
    output = model(**model_inputs, **kwargs)
    logits = output.logits
    if logits.shape[1] == len(keep) and kwargs:
        index = torch.tensor([keep.index(p) for p in (positions - offset).tolist()])
    else:  # the forward computed every position
        index = positions - offset
    cache = _cache_of(output) if model_inputs.get("use_cache") else None
    return logits[torch.arange(len(index)), index.to(logits.device)], cache


def _cache_of(output) -> Any:
    """A forward output's KV cache: its ``cache`` field (transformers 5.2x), else ``past_key_values``."""
    if "cache" in getattr(output, "__dataclass_fields__", {}):
        return output.cache
    return getattr(output, "past_key_values", None)


def forget_position_state(model: nn.Module) -> None:
    """Drop the M-RoPE position deltas a model keeps from its last forward (``rope_deltas``: Qwen2-VL and its kin)
    before a forward whose cache is continued: a text-only prompt does not recompute them, so its continuation
    would be placed with an earlier image prompt's deltas. The next prompt with an image recomputes them.

    Args:
        model: the model; every submodule's non-None ``rope_deltas`` is set to None (a no-op for other families).
    """
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


def last_logits(model: nn.Module, inputs: dict[str, torch.Tensor], prefix: int = 0,
                return_cache: bool = False) -> Any:
    """Next-token logits (B, V) at each row's last real token of a right-padded batch.

    With ``prefix`` = P > 0, the first P tokens, the same in every row and holding no image placeholder, are
    encoded once (one row, text only) and their KV cache is repeated for the rows, whose remaining tokens (and
    images) are then forwarded on it: a prompt's shared chat preamble (system prompt, role tags) is computed once
    per batch instead of once per item. Same logits as without up to float summation order.

    Args:
        model: the model.
        inputs: a right-padded encoded batch (``encode(..., side="right")``) on the CPU.
        prefix: tokens shared by every row to encode once (0: none).
        return_cache: also return the KV cache of the whole batch (to score continuations on it).

    Returns:
        The logits, or (logits, cache) with ``return_cache``; None when a prefix is asked for and the model's cache
        cannot be repeated per row, or a cache is asked for and the model returns none (the caller falls back).
    """
    positions = _last_positions(inputs["attention_mask"])
    moved = to_model(inputs, model)
    if prefix or return_cache:
        forget_position_state(model)
    if prefix > 0:
        ids, mask = moved["input_ids"], moved["attention_mask"]
        cache = _cache_of(model(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], use_cache=True))
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(ids.shape[0])
        per_token = {key: value[:, prefix:] for key, value in moved.items()
                     if key != "attention_mask" and isinstance(value, torch.Tensor) and not value.is_floating_point()
                     and value.shape[:2] == ids.shape}
        moved = {**moved, **per_token, cache_kwarg(model): cache}
    logits, cache = _logits_at(model, {**moved, "use_cache": bool(prefix or return_cache)}, positions, prefix)
    if not return_cache:
        return logits
    return None if cache is None else (logits, cache)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists: where a continuation's tokens start.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


__all__ = ["build_prompt", "cache_kwarg", "common_prefix", "encode", "forget_position_state", "forward_rows",
           "inference", "last_logits", "real_ids", "real_positions", "to_model", "tokenizer_of"]
