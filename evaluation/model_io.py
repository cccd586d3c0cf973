"""Model I/O shared by the harness, the lmms-eval bridge and the default-model trainer: the chat prompt,
encoding, device placement, forwards read back per row, greedy generation, and the token-level common prefix.

One place for each, so the harness, the bridge and the trainer build the same prompt and read the same
tokens. The device and float dtype always come from the model's parameters; opening an image is
:func:`pruning.data.open_image` (calibration data uses it too).
"""

from __future__ import annotations

import contextlib
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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists: where a continuation's tokens start.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


__all__ = ["build_prompt", "common_prefix", "encode", "forward_rows", "inference", "real_ids", "real_positions",
           "to_model", "tokenizer_of"]
