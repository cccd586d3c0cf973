"""Fidelity of a model to its dense version on multimodal prompts: the sensitivity map's cheap metric.

A *prompt* is a benchmark question with an image in the harness's chat prompt, followed by its reference
answer (a choice item's answer, an open item's first answer), so the answer positions are scored too. The
dense model's next-token distributions are kept once (:func:`prompt_reference`, top-k plus the rest mass,
as the text fidelity reference); a pruned variant is then scored at every position that predicts a text
token (:func:`prompt_fidelity`): mean KL(dense || model) and top-1 agreement, each prompt weighing the same.
Positions predicting a visual token (inside the image) are left out: there the LM predicts no text.

    prompts = answer_prompts(benchmarks, 32, seed=0)
    reference = prompt_reference(dense, processor, prompts)
    scores = prompt_fidelity(pruned, processor, prompts, reference)     # scores.kl, scores.top1
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pruning.adapters import get_adapter
from pruning.data import open_image

from . import metrics
from .benchmarks import CHOICE, OPEN, Benchmark, BenchmarkError
from .model_io import build_prompt, encode, forward_rows, inference

DEFAULT_TOP_K = 128


@dataclass(frozen=True)
class Prompt:
    id: str             # "<benchmark>/<item id>"
    question: str
    answer: str
    image: Path


def answer_prompts(benchmarks: Sequence[Benchmark], n: int, seed: int = 0) -> list[Prompt]:
    """``n`` prompts from the items with an image of the choice and open benchmarks: each benchmark's items
    in a seeded order, taken round robin (so every benchmark is represented). BenchmarkError when the
    benchmarks hold fewer than ``n`` such items."""
    if n < 1:
        raise BenchmarkError(f"the number of prompts must be >= 1, got {n}")
    rng = random.Random(seed)
    queues = []
    for bench in benchmarks:
        if getattr(bench, "kind", None) not in (CHOICE, OPEN):
            continue
        items = [i for i in bench.items if i.image is not None]
        rng.shuffle(items)
        queues.append([Prompt(f"{bench.name}/{i.id}", i.question, i.answer if bench.kind == CHOICE else i.answers[0],
                              Path(i.image)) for i in items])
    available = sum(len(q) for q in queues)
    if available < n:
        raise BenchmarkError(f"{n} multimodal prompts asked for, but the benchmarks hold {available} question items "
                             "with an image; pass fewer prompts or more benchmark files")
    prompts: list[Prompt] = []
    while len(prompts) < n:
        for queue in queues:
            if queue and len(prompts) < n:
                prompts.append(queue.pop(0))
    return prompts


@dataclass
class PromptReference:
    """The dense model's view of each prompt: token ids (T,), the scored positions (S,) and the reference
    distributions at those positions."""

    ids: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    distributions: dict[str, metrics.ReferenceDistribution]
    top_k: int | None

    def save(self, path: str | Path) -> None:
        torch.save({"top_k": self.top_k, "prompts": {
            k: {"ids": self.ids[k], "positions": self.positions[k], **vars(self.distributions[k])} for k in self.ids}},
            Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "PromptReference":
        payload = torch.load(Path(path), weights_only=True)
        ids, positions, dists = {}, {}, {}
        for key, entry in payload["prompts"].items():
            ids[key], positions[key] = entry.pop("ids"), entry.pop("positions")
            dists[key] = metrics.ReferenceDistribution(**entry)
        return cls(ids, positions, dists, payload["top_k"])


@dataclass(frozen=True)
class PromptFidelity:
    """Per prompt (in order): mean KL(dense || model) and top-1 agreement (%) over its scored positions."""

    kl_items: list[float]
    top1_items: list[float]

    @property
    def kl(self) -> float:
        return sum(self.kl_items) / len(self.kl_items)

    @property
    def top1(self) -> float:
        return sum(self.top1_items) / len(self.top1_items)


def _rows(model: nn.Module, processor, prompts: Sequence[Prompt], batch_size: int):
    """(prompt, real ids (T,), logits (T, V), scored positions (S,)) per prompt, ``batch_size`` at a time."""
    adapter = get_adapter(model)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts = [build_prompt(processor, p.question, True) + p.answer for p in chunk]
        inputs = encode(processor, texts, [open_image(p.image) for p in chunk], "right")
        for prompt, (ids, logits) in zip(chunk, forward_rows(model, inputs)):
            ids = ids.cpu()
            text_next = ~adapter.visual_mask(model, ids[None])[0].cpu()[1:]  # position t predicts token t + 1
            yield prompt, ids, logits, text_next.nonzero().squeeze(1)


def prompt_reference(dense_model: nn.Module, processor, prompts: Sequence[Prompt], *, batch_size: int = 8,
                     top_k: int | None = DEFAULT_TOP_K) -> PromptReference:
    """The dense model's distributions at the scored positions of every prompt, kept on the CPU."""
    ids, positions, dists = {}, {}, {}
    with inference(dense_model):
        for prompt, row_ids, logits, scored in _rows(dense_model, processor, prompts, batch_size):
            ids[prompt.id], positions[prompt.id] = row_ids, scored
            dists[prompt.id] = metrics.reference_distribution(logits[scored.to(logits.device)], top_k)
    return PromptReference(ids, positions, dists, top_k)


def prompt_fidelity(model: nn.Module, processor, prompts: Sequence[Prompt], reference: PromptReference, *,
                    batch_size: int = 8) -> PromptFidelity:
    """Mean KL and top-1 agreement of ``model`` to the reference, per prompt."""
    kl, top1 = [], []
    with inference(model):
        for prompt, row_ids, logits, scored in _rows(model, processor, prompts, batch_size):
            if prompt.id not in reference.ids or not torch.equal(row_ids, reference.ids[prompt.id]):
                raise BenchmarkError(f"prompt {prompt.id!r} is not in the reference or tokenised differently; "
                                     "build the reference from the same prompts and processor")
            picked = logits[scored.to(logits.device)]
            dist = reference.distributions[prompt.id]
            kl.append(float(metrics.kl_to_reference(dist, picked).mean()))
            top1.append(100.0 * float(metrics.top1_agreement(dist, picked).float().mean()))
    return PromptFidelity(kl, top1)
