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

A variant that differs from the dense model only from decoder layer l on (the sensitivity map prunes one
layer per cell) is scored faster from the dense model's kept layer inputs (:func:`prompt_states`): only
layers l.. are replayed, then the final norm and the LM head at the scored positions only
(:func:`replayed_fidelity`) -- the same numbers as its full forward, without the vision tower and the
earlier layers.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from pruning.adapters import REPLAY_TOLERANCE, Adapter, CapturedBatch, get_adapter
from pruning.data import open_image
from pruning.errors import UnsupportedModelError
from pruning.replay import capture, propagate_, replay_layers

from . import metrics
from .benchmarks import CHOICE, OPEN, Benchmark, BenchmarkError
from .model_io import build_prompt, encode, forward_rows, inference, real_positions, to_model

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


def _encoded(processor, prompts: Sequence[Prompt], batch_size: int) -> Iterator[tuple[list[Prompt], dict]]:
    """The prompts ``batch_size`` at a time, each chunk with its encoded inputs (right padding)."""
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        texts = [build_prompt(processor, p.question, True) + p.answer for p in chunk]
        yield chunk, encode(processor, texts, [open_image(p.image) for p in chunk], "right")


def _scored(model: nn.Module, adapter, ids: torch.Tensor) -> torch.Tensor:
    """(S,) the positions of a prompt's real ids (T,) that predict a text token (position t predicts t + 1)."""
    text_next = ~adapter.visual_mask(model, ids[None])[0].cpu()[1:]
    return text_next.nonzero().squeeze(1)


def _rows(model: nn.Module, processor, prompts: Sequence[Prompt], batch_size: int):
    """(prompt, real ids (T,), logits (T, V), scored positions (S,)) per prompt, ``batch_size`` at a time."""
    adapter = get_adapter(model)
    for chunk, inputs in _encoded(processor, prompts, batch_size):
        for prompt, (ids, logits) in zip(chunk, forward_rows(model, inputs)):
            ids = ids.cpu()
            yield prompt, ids, logits, _scored(model, adapter, ids)


def _compare(reference: PromptReference, prompt: Prompt, ids: torch.Tensor,
             picked: torch.Tensor) -> tuple[float, float]:
    """(mean KL, top-1 agreement %) of one prompt's logits at its scored positions (S, V) to the reference."""
    if prompt.id not in reference.ids or not torch.equal(ids, reference.ids[prompt.id]):
        raise BenchmarkError(f"prompt {prompt.id!r} is not in the reference or tokenised differently; "
                             "build the reference from the same prompts and processor")
    dist = reference.distributions[prompt.id]
    return (float(metrics.kl_to_reference(dist, picked).mean()),
            100.0 * float(metrics.top1_agreement(dist, picked).float().mean()))


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
    """Mean KL and top-1 agreement of ``model`` to the reference, per prompt: one full forward per batch."""
    kl, top1 = [], []
    with inference(model):
        for prompt, row_ids, logits, scored in _rows(model, processor, prompts, batch_size):
            value, agree = _compare(reference, prompt, row_ids, logits[scored.to(logits.device)])
            kl.append(value)
            top1.append(agree)
    return PromptFidelity(kl, top1)


# -- the replayed path: a variant that differs from the dense model from one decoder layer on --------------------
@dataclass
class PromptBatch:
    """One batch of prompts as the decoder sees it."""

    prompts: list[Prompt]
    ids: list[torch.Tensor]          # per prompt its real token ids (T_p,), on the CPU
    positions: list[torch.Tensor]    # per prompt its scored positions among its real tokens (S_p,)
    captured: CapturedBatch          # the batch at decoder layer 0: each layer's kwargs, the modality masks
    scored: torch.Tensor             # (S,) flat (B*T) indices of the scored positions, prompt after prompt

    @property
    def counts(self) -> list[int]:
        return [len(p) for p in self.positions]


@dataclass
class PromptStates:
    """The dense model's hidden states on the prompts at the input of every decoder layer.

    A variant equal to the dense model before decoder layer l (a map cell prunes layer l only) is then scored
    by replaying layers l.. from ``inputs[l]`` (:func:`replayed_fidelity`): no vision tower, no embeddings, no
    earlier layers, and the numbers of its full forward (the replay of captured layer inputs is bitwise the
    model's own forward). Memory: layers x batches x (B, T, C) in the model's dtype (:attr:`nbytes`).
    """

    batches: list[PromptBatch]
    inputs: list[list[torch.Tensor]]  # inputs[l][j]: (B, T, C) input of decoder layer l for batch j

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for level in self.inputs for t in level)


def _prompt_batch(model: nn.Module, adapter, chunk: list[Prompt], inputs: dict) -> PromptBatch:
    """Capture one encoded batch at decoder layer 0 and locate its scored positions."""
    captured = capture(model, adapter, to_model(inputs, model))
    width = inputs["input_ids"].shape[1]
    ids, positions, flat = [], [], []
    for row, real in enumerate(real_positions(inputs["attention_mask"])):
        row_ids = inputs["input_ids"][row, real].cpu()
        scored = _scored(model, adapter, row_ids)
        ids.append(row_ids)
        positions.append(scored)
        flat.append(row * width + real[scored])
    return PromptBatch(chunk, ids, positions, captured, torch.cat(flat))


def _scored_logits(model: nn.Module, adapter, hidden: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """The logits (S, V) at the batch's scored positions from the last decoder layer's outputs (B, T, *state): state
    (C,), or a hyper-connection model's streams, which its final modules reduce and expect as (B, T, ...)."""
    rows = hidden.flatten(0, 1).index_select(0, batch.scored.to(hidden.device))
    return adapter.logits(model, rows.unsqueeze(0))[0]


def _check_against_forward(model: nn.Module, inputs: dict, batch: PromptBatch, logits: torch.Tensor) -> None:
    """The replayed logits of a batch must be the model's own forward's, up to float noise (the LM head on a
    subset of rows); UnsupportedModelError when the model does work the adapter's replay or head leave out."""
    want = torch.cat([row_logits[p.to(row_logits.device)] for (_, row_logits), p
                      in zip(forward_rows(model, inputs), batch.positions)])
    error, scale = float((logits - want.to(logits.device)).abs().max()), float(want.abs().max())
    if error > REPLAY_TOLERANCE * scale:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the logits replayed from the decoder layers differ from the model's forward by "
            f"{error:.3g} (scale {scale:.3g}); its adapter's replay or final_norm/logits miss what the model does")


def check_replayed_logits(model: nn.Module, inputs: dict, *, adapter: Adapter | None = None) -> None:
    """The check :func:`prompt_states` runs on its first batch, on one batch of encoded ``inputs`` (input_ids,
    attention_mask, ...): UnsupportedModelError when the logits replayed from the decoder layers at the scored positions
    differ from the model's forward, or when the adapter cannot compute logits from the last layer's output.
    ``adapter``: the one that replays ``model`` (None: ``get_adapter(model)``; a probed model: ``probe.adapter``)."""
    adapter = adapter or get_adapter(model)
    with inference(model):
        batch = _prompt_batch(model, adapter, [], inputs)
        running = batch.captured.fork()
        propagate_(model, adapter, [running], range(len(adapter.decoder_layers(model))))
        _check_against_forward(model, inputs, batch, _scored_logits(model, adapter, running.hidden, batch))


def prompt_states(model: nn.Module, processor, prompts: Sequence[Prompt], *, batch_size: int = 8,
                  top_k: int | None = DEFAULT_TOP_K, adapter: Adapter | None = None
                  ) -> tuple[PromptStates, PromptReference]:
    """One dense pass over the prompts: every decoder layer's inputs, and the reference distributions.

    The reference comes from the replayed logits (the same arithmetic as every :func:`replayed_fidelity`, so
    the dense model scores KL 0 exactly); the first batch is checked against the model's full forward.
    ``adapter`` as for :func:`check_replayed_logits`."""
    adapter = adapter or get_adapter(model)
    n_layers = len(adapter.decoder_layers(model))
    batches, inputs = [], [[] for _ in range(n_layers)]
    ids, positions, dists = {}, {}, {}
    with inference(model):
        for chunk, encoded in _encoded(processor, prompts, batch_size):
            batch = _prompt_batch(model, adapter, chunk, encoded)
            running = batch.captured.fork()  # its own ``hidden``: the replay chains through it
            for step in replay_layers(model, adapter, [running], range(n_layers)):
                inputs[step.index].append(step.inputs)
            # the dense state each layer handed the next (if the model passes any), for replays that start mid-stack
            batch.captured = dataclasses.replace(running, hidden=batch.captured.hidden)
            logits = _scored_logits(model, adapter, running.hidden, batch)
            if not batches:
                _check_against_forward(model, encoded, batch, logits)
            for prompt, row_ids, scored, part in zip(chunk, batch.ids, batch.positions, logits.split(batch.counts)):
                ids[prompt.id], positions[prompt.id] = row_ids, scored
                dists[prompt.id] = metrics.reference_distribution(part, top_k)
            batches.append(batch)
    return PromptStates(batches, inputs), PromptReference(ids, positions, dists, top_k)


def replayed_fidelity(model: nn.Module, states: PromptStates, reference: PromptReference,
                      first_layer: int = 0, *, adapter: Adapter | None = None) -> PromptFidelity:
    """Mean KL and top-1 agreement of ``model`` to the reference, per prompt, for a model that equals the dense
    model of ``states`` before decoder layer ``first_layer``: layers ``first_layer``.. are replayed from the kept
    inputs, then the final norm and the LM head at the scored positions only.

        states, reference = prompt_states(dense, processor, prompts)
        ...prune decoder layer 12 of dense...
        scores = replayed_fidelity(dense, states, reference, first_layer=12)

    ``adapter`` as for :func:`check_replayed_logits` (a probed model's layers replay with its probe's routing).
    """
    adapter = adapter or get_adapter(model)
    n_layers = len(adapter.decoder_layers(model))
    if not 0 <= first_layer < n_layers or len(states.inputs) != n_layers:
        raise ValueError(f"first_layer must be in [0, {n_layers}) for states of the same model, got {first_layer} "
                         f"(states of {len(states.inputs)} layers)")
    kl, top1 = [], []
    with inference(model):
        for j, batch in enumerate(states.batches):
            running = batch.captured.fork(hidden=states.inputs[first_layer][j])
            propagate_(model, adapter, [running], range(first_layer, n_layers))
            logits = _scored_logits(model, adapter, running.hidden, batch)
            for prompt, row_ids, part in zip(batch.prompts, batch.ids, logits.split(batch.counts)):
                value, agree = _compare(reference, prompt, row_ids, part)
                kl.append(value)
                top1.append(agree)
    return PromptFidelity(kl, top1)
