"""Model orchestration: prompts, batching, forwards and generation; the math is in :mod:`.metrics`.

Works for any HF-style LVLM (plain, pruned, or an MoT probe): inputs always carry ``input_ids``
(modality routing reads them), the device and float dtype come from the model's parameters, and
the model runs in eval mode under ``torch.no_grad`` (its training flag is restored afterwards).

Padding: scoring forwards are right-padded, so every real token keeps the position it has
unpadded, and the real tokens of each row are read back through its ``attention_mask`` (padding
is never scored, whichever side it sits on). Generation is left-padded, as decoder-only
``generate`` requires.

Example::

    benches = [load_benchmark(p) for p in ("suite/digits.jsonl", "suite/count.jsonl", "suite/wiki.jsonl")]
    reference = fidelity_reference(dense, processor, benches)        # once; dense can then be freed
    dense_report = evaluate(dense, processor, benches, reference=reference)
    pruned_report = evaluate(pruned, processor, benches, reference=reference)
    print(retention(pruned_report, dense_report).mean)
"""

from __future__ import annotations

import copy
import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from pruning.data import open_image
from pruning.errors import ConfigError

from . import metrics
from .benchmarks import (
    CHOICE,
    FIDELITY,
    OPEN,
    Benchmark,
    BenchmarkError,
    ChoiceItem,
    OpenItem,
    TextItem,
    load_benchmark,
)
from .model_io import (
    build_prompt,
    cache_kwarg,
    common_prefix,
    encode,
    forward_rows,
    greedy_generate,
    inference,
    last_logits,
    real_ids,
    to_model,
    tokenizer_of,
)
from .reports import BenchmarkResult, EvalReport, ItemResult

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 128  # reference log-probs kept per position; None keeps the full vocabulary (exact KL)
Benchmarks = Benchmark | str | Path | Sequence[Benchmark | str | Path]


def _by_modality(entries: list, has_image) -> list[list]:
    """Split a list into the entries with an image and those without (a batch is all one or the other)."""
    groups = [[e for e in entries if has_image(e)], [e for e in entries if not has_image(e)]]
    return [g for g in groups if g]


def _chunks(seq: Sequence, size: int) -> Iterator[Sequence]:
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


# -- multiple choice -------------------------------------------------------------------------------


@dataclass
class _ChoicePlan:
    """An item's prompt and the token ids of prompt + each option."""

    item: ChoiceItem
    prompt: str
    image: Image.Image | None
    prompt_ids: list[int]
    full_ids: list[list[int]]  # per option: real token ids of prompt + option
    starts: list[int]  # per option: index of its first continuation token

    @property
    def merged(self) -> bool:
        """Some option's tokens merged with the end of the prompt (its continuation starts inside the prompt)."""
        return min(self.starts) < len(self.prompt_ids)

    @property
    def single_token(self) -> bool:
        """Every option adds exactly one token right after the tokenised prompt: one forward scores all."""
        n = len(self.prompt_ids)
        return all(s == n and len(f) == n + 1 for s, f in zip(self.starts, self.full_ids))


def _plan_choice(processor, item: ChoiceItem) -> _ChoicePlan:
    """Tokenise the prompt and prompt + option with the processor (so image tokens are expanded).

    The continuation of an option is what follows the longest common prefix of the two token
    lists: the tokenised prompt itself when tokenisation is prefix-consistent, else (the option
    merged with the prompt's last token) the first differing token on (counted and logged).
    """
    image = open_image(item.image) if item.image is not None else None
    prompt = build_prompt(processor, item.question, image is not None)
    texts = [prompt] + [prompt + option for option in item.options]
    rows = real_ids(encode(processor, texts, [image] * len(texts) if image else None, "right"))
    prompt_ids, full_ids = rows[0], rows[1:]
    starts = [common_prefix(prompt_ids, full) for full in full_ids]
    for option, start, full in zip(item.options, starts, full_ids):
        if not 1 <= start < len(full):
            raise BenchmarkError(f"item {item.id!r}: option {option!r} adds no token to the prompt "
                                 f"({len(prompt_ids)} prompt tokens, {len(full)} with the option)")
        if start < len(prompt_ids):
            log.debug("item %r: option %r merges with the prompt's last %d token(s)", item.id, option,
                      len(prompt_ids) - start)
    return _ChoicePlan(item, prompt, image, prompt_ids, full_ids, starts)


def _check_ids(ids: torch.Tensor | list[int], expected: list[int], item_id: str) -> None:
    if (ids.tolist() if isinstance(ids, torch.Tensor) else ids) != expected:
        raise RuntimeError(f"item {item_id!r}: the processor tokenised the same text differently in a batch "
                           f"({len(ids)} vs {len(expected)} tokens)")


def _general_scores(model: nn.Module, processor, plan: _ChoicePlan, batch_size: int) -> list[float]:
    """Log-likelihood of each option from forwards of prompt + option, ``batch_size`` options at a time."""
    scores: list[float] = []
    order = list(range(len(plan.item.options)))
    for chunk in _chunks(order, batch_size):
        texts = [plan.prompt + plan.item.options[o] for o in chunk]
        images = [plan.image] * len(texts) if plan.image else None
        rows = forward_rows(model, encode(processor, texts, images, "right"))
        for o, (ids, logits) in zip(chunk, rows):
            _check_ids(ids, plan.full_ids[o], plan.item.id)
            scores.append(metrics.continuation_logprob(logits, ids, plan.starts[o]))
    return scores


def _fast_scores(model: nn.Module, processor, plans: list[_ChoicePlan],
                 shared_prefix: bool = True) -> list[list[float]]:
    """Single-token options of several items: one forward of the prompts, read at each last real position
    (their preamble encoded once when ``shared_prefix`` and the model allows, see :func:`_shared_logits`)."""
    images = [p.image for p in plans] if plans[0].image else None
    inputs = encode(processor, [p.prompt for p in plans], images, "right")
    for plan, ids in zip(plans, real_ids(inputs)):
        _check_ids(ids, plan.prompt_ids, plan.item.id)
    logits = _shared_logits(model, processor, inputs) if shared_prefix else last_logits(model, inputs)
    return [metrics.next_token_logprobs(row, [f[-1] for f in plan.full_ids]) for plan, row in zip(plans, logits)]


MIN_SHARED_PREFIX = 4  # fewer shared tokens than this are not worth a second forward
_PLACEHOLDER = re.compile(r"(image|video|vision|audio|boi|boa|img|media)\w*_token(_id|_index|_ids)?$")
# model -> {batch has images: sharing verified}; text-only and image batches are verified apart
_SHARING_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, dict[bool, bool]]" = weakref.WeakKeyDictionary()


def _placeholder_ids(model: nn.Module, processor) -> set[int]:
    """Token ids that stand for (or open) image, video or audio content, from the model's configs and the
    processor's attributes: a shared prefix stops before the first of them."""
    found: set[int] = set()
    configs, seen = [model.config], set()
    while configs:
        config = configs.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        for key, value in vars(config).items():
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                configs.append(value)
            elif _PLACEHOLDER.search(key) and isinstance(value, int) and not isinstance(value, bool):
                found.add(value)
    tokenizer = tokenizer_of(processor)
    for key in dir(processor):
        if not _PLACEHOLDER.search(key) or key.startswith("_"):
            continue
        value = getattr(processor, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            found.add(value)
        elif isinstance(value, str) and value:
            token = tokenizer.convert_tokens_to_ids(value)
            if isinstance(token, int) and token != tokenizer.unk_token_id:
                found.add(token)
    return found


def shared_prefix_length(inputs: dict[str, torch.Tensor], placeholders: set[int]) -> int:
    """Leading tokens that every row of a right-padded batch shares, up to (not including) the first image
    placeholder and leaving each row at least one token of its own; 0 for a single row.

    >>> shared_prefix_length({"input_ids": torch.tensor([[5, 6, 9, 7], [5, 6, 9, 8]]),
    ...                       "attention_mask": torch.ones(2, 4, dtype=torch.long)}, {9})
    2
    """
    ids = inputs["input_ids"]
    if ids.shape[0] < 2:
        return 0
    same = int((ids == ids[:1]).all(0).long().cumprod(0).sum())
    first = next((i for i, t in enumerate(ids[0, :same].tolist()) if t in placeholders), same)
    return max(0, min(first, int(inputs["attention_mask"].sum(1).min()) - 1))


def _verdicts(table: "weakref.WeakKeyDictionary[nn.Module, dict[bool, bool]]", model: nn.Module) -> dict[bool, bool]:
    """``model``'s entry in a table of verified shortcuts (batch has images -> verified), made on first use: models
    that keep M-RoPE position deltas between calls (``rope_deltas``: Qwen2-VL and its kin) start refused for both,
    since a later batch's positions would depend on an earlier call."""
    if model not in table:
        stateful = any(hasattr(module, "rope_deltas") for module in model.modules())
        table[model] = {True: False, False: False} if stateful else {}
    return table[model]


def _tolerance(model: nn.Module) -> float:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return 1e-3 if dtype in (torch.float32, torch.float64) else 1e-1


def _shared_logits(model: nn.Module, processor, inputs: dict[str, torch.Tensor], return_cache: bool = False) -> Any:
    """:func:`last_logits` of the batch, its shared preamble encoded once where the model allows.

    The first time a model could share a prefix (once for text-only batches, once for batches with images),
    both ways are computed and compared (every log-prob within rounding tolerance): a family whose forward does
    not accept a text-only cache before the image (cross-attention masks, ...) shows it there and keeps
    whole-prompt forwards; that batch is scored from the whole prompts either way. Models that keep M-RoPE
    position deltas between calls (a ``rope_deltas`` attribute: Qwen2-VL and its kin) never share, since a later
    batch's positions would depend on an earlier call."""
    prefix = shared_prefix_length(inputs, _placeholder_ids(model, processor))
    with_images = any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in inputs.values())
    verdicts = _verdicts(_SHARING_VERIFIED, model)
    if prefix >= MIN_SHARED_PREFIX and verdicts.get(with_images):
        try:
            return last_logits(model, inputs, prefix, return_cache)
        except Exception as err:  # noqa: BLE001 - verified on an earlier batch but not on this one: stop sharing
            log.warning("%s: a shared prompt prefix failed after it was verified (%s: %s); scoring whole prompts "
                        "from here on", type(model).__name__, type(err).__name__, err)
            verdicts[with_images] = False
    plain = last_logits(model, inputs, 0, return_cache)
    if prefix >= MIN_SHARED_PREFIX and with_images not in verdicts and plain is not None:
        verdicts[with_images] = _shares_like(model, inputs, prefix, plain[0] if return_cache else plain)
    return plain


def _shares_like(model: nn.Module, inputs: dict[str, torch.Tensor], prefix: int, plain: torch.Tensor) -> bool:
    """Whether the shared-prefix pass gives ``plain``'s log-probs within rounding tolerance (False if it fails)."""
    try:
        shared = last_logits(model, inputs, prefix)
    except Exception as err:  # noqa: BLE001 - any failure means: this family cannot share, score whole prompts
        log.debug("%s: a shared prompt prefix fails (%s); scoring whole prompts", type(model).__name__, err)
        return False
    ok = shared is not None and shared.shape == plain.shape and bool(
        (torch.log_softmax(shared.float(), -1) - torch.log_softmax(plain.float(), -1)).abs().max() <= _tolerance(model))
    log.debug("%s: shared prompt prefix %s", type(model).__name__, "verified" if ok else "differs; not used")
    return ok


def _prefix_scores(model: nn.Module, processor, plans: list[_ChoicePlan], batch_size: int,
                   shared_prefix: bool = True) -> list[list[float]] | None:
    """Items of one modality and option count scored over shared prompts: one forward of the prompts (right-padded
    when their lengths differ) with a KV cache, then forwards of the options' continuations on copies of their
    items' cache rows, at most ``batch_size`` option rows each (or one item's options when it has more). Each prompt,
    image included, is encoded once instead of once per option, and the prompts of a batch go through one forward
    (their shared preamble once with ``shared_prefix``). Same log-likelihoods as :func:`_general_scores` up to float
    summation order. None when the model's cache cannot be copied per option (the caller falls back)."""
    images = [p.image for p in plans] if plans[0].image else None
    inputs = encode(processor, [p.prompt for p in plans], images, "right")
    for plan, ids in zip(plans, real_ids(inputs)):
        _check_ids(ids, plan.prompt_ids, plan.item.id)
    prompted = (_shared_logits(model, processor, inputs, return_cache=True) if shared_prefix
                else last_logits(model, inputs, return_cache=True))
    if prompted is None or not hasattr(prompted[1], "batch_select_indices"):
        return None
    first, cache = prompted  # first[g] (V,) predicts the first token of each of item g's options
    per_forward = max(1, batch_size // len(plans[0].full_ids))  # items whose options share a forward
    scores: list[list[float]] = []
    for start in range(0, len(plans), per_forward):
        stop = min(start + per_forward, len(plans))
        rows = cache if stop == len(plans) else copy.deepcopy(cache)  # the last chunk may consume the original
        scores += _continuation_scores(model, processor, plans[start:stop], first[start:stop], rows, start,
                                       inputs["attention_mask"])
    return scores


def _continuation_scores(model: nn.Module, processor, plans: list[_ChoicePlan], first: torch.Tensor, cache: Any,
                         offset: int, prompt_mask: torch.Tensor) -> list[list[float]]:
    """Every option of ``plans`` (items ``offset``, ``offset + 1``, ... of the prompt batch ``cache`` holds, whose
    right-padded attention mask is ``prompt_mask``) in one forward of their continuations, each row on its item's
    cached prompt; ``first[g]`` predicts the first continuation token of item g's options. ``cache`` is consumed
    (rows selected, continuations appended)."""
    n_options = len(plans[0].full_ids)
    continuations = [full[len(plan.prompt_ids):] for plan in plans for full in plan.full_ids]  # item-major, L >= 1
    width = max(map(len, continuations))
    pad = tokenizer_of(processor).pad_token_id or 0
    # Right padding after each continuation: with the causal mask alone no real token sees a pad.
    ids = torch.tensor([c + [pad] * (width - len(c)) for c in continuations])  # (G * O, L)
    items = torch.arange(offset, offset + len(plans)).repeat_interleave(n_options)
    cache.batch_select_indices(items)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    lengths = prompt_mask.sum(1)[items]
    if bool((lengths < prompt_mask.shape[1]).any()):  # padded prompts: mask their pads, place each row after its own
        inputs["attention_mask"] = torch.cat([prompt_mask[items], torch.ones_like(ids)], 1)
        inputs["position_ids"] = lengths[:, None] + torch.arange(width)
    # else no mask: each family derives positions from the cache length, as in decoding
    rest = model(**to_model(inputs, model), **{cache_kwarg(model): cache},
                 use_cache=True).logits  # (G * O, L, V): rest[r, j] predicts continuation token j + 1
    scores: list[list[float]] = []
    for g in range(len(plans)):
        rows = range(g * n_options, (g + 1) * n_options)
        scores.append([metrics.targets_logprob(torch.cat([first[g][None], rest[r, :len(continuations[r]) - 1]]),
                                               torch.tensor(continuations[r])) for r in rows])
    return scores


# model -> {batch has images: prompts of unequal length may share a padded prompt forward}
_PADDING_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, dict[bool, bool]]" = weakref.WeakKeyDictionary()


def _padded_prefix_scores(model: nn.Module, processor, plans: list[_ChoicePlan], batch_size: int,
                          shared_prefix: bool = True) -> list[list[float]] | None:
    """:func:`_prefix_scores` of items of one modality and option count whose prompts may differ in length: one
    right-padded prompt forward where the model allows, else one per prompt length. The first time a model meets
    prompts of unequal length (once for text-only items, once for items with images) both ways are computed and
    compared (every score within rounding tolerance per token); a family whose positions do not follow the
    padding (M-RoPE: Qwen2-VL and its kin, sliding windows) keeps one forward per prompt length."""
    by_length: dict[int, list[_ChoicePlan]] = {}
    for plan in plans:
        by_length.setdefault(len(plan.prompt_ids), []).append(plan)
    if len(by_length) == 1:
        return _prefix_scores(model, processor, plans, batch_size, shared_prefix)
    with_images = plans[0].image is not None
    verdicts = _verdicts(_PADDING_VERIFIED, model)
    if verdicts.get(with_images):
        try:
            return _prefix_scores(model, processor, plans, batch_size, shared_prefix)
        except Exception as err:  # noqa: BLE001 - verified on an earlier batch but not on this one: stop padding
            log.warning("%s: a padded prompt pass failed after it was verified (%s: %s); one prompt forward per "
                        "prompt length from here on", type(model).__name__, type(err).__name__, err)
            verdicts[with_images] = False
    apart: dict[str, list[float]] = {}
    for group in by_length.values():
        scores = _prefix_scores(model, processor, group, batch_size, shared_prefix)
        if scores is None:
            return None
        apart.update({plan.item.id: s for plan, s in zip(group, scores)})
    ordered = [apart[plan.item.id] for plan in plans]
    if with_images not in verdicts:
        verdicts[with_images] = _pads_like(model, processor, plans, batch_size, shared_prefix, ordered)
    return ordered


def _pads_like(model: nn.Module, processor, plans: list[_ChoicePlan], batch_size: int, shared_prefix: bool,
               apart: list[list[float]]) -> bool:
    """Whether one padded prompt forward gives ``apart``'s scores within rounding tolerance per token."""
    try:
        padded = _prefix_scores(model, processor, plans, batch_size, shared_prefix)
    except Exception as err:  # noqa: BLE001 - any failure means: this family cannot pad, one forward per length
        log.debug("%s: padded prompts fail (%s); one prompt forward per prompt length", type(model).__name__, err)
        return False
    tolerance = _tolerance(model)
    ok = padded is not None and all(
        abs(a - b) <= tolerance * max(1, len(full) - len(plan.prompt_ids))
        for plan, row, want in zip(plans, padded, apart) for a, b, full in zip(row, want, plan.full_ids))
    log.debug("%s: padded prompts %s", type(model).__name__, "verified" if ok else "differ; not used")
    return ok


def _prefix_groups(plans: list[_ChoicePlan]) -> list[list[_ChoicePlan]]:
    """Plans with the same modality and option count (their prompts share one forward where the model allows)."""
    groups: dict[tuple[bool, int], list[_ChoicePlan]] = {}
    for plan in plans:
        groups.setdefault((plan.image is not None, len(plan.full_ids)), []).append(plan)
    return list(groups.values())


def _choice_item(plan: _ChoicePlan, scores: list[float]) -> ItemResult:
    best = plan.item.options[metrics.argmax(scores)]
    lengths = [len(full) - start for full, start in zip(plan.full_ids, plan.starts)]
    return ItemResult(plan.item.id, best, float(best == plan.item.answer),
                      {"logprobs": scores, "continuation_tokens": lengths})


def score_choice(model: nn.Module, processor, benchmark: Benchmark, *, batch_size: int = 8,
                 fast_path: bool = True, prefix_cache: bool = True, shared_prefix: bool = True,
                 progress: bool = True) -> BenchmarkResult:
    """Multiple choice by log-likelihood: each option's summed token log-probs given the prompt, argmax.

    Items are taken ``batch_size`` at a time. An item whose options are all one continuation token
    is scored from one forward of its prompt, batched with the other such items (``fast_path``), the
    preamble their prompts share (system prompt, role tags: everything before the first image
    placeholder) encoded once per batch where the model allows (``shared_prefix``, verified against
    whole-prompt forwards on the model's first batch);
    items with longer options encode their prompts once, in one forward per batch (items of the same modality
    and option count; prompts of unequal length right-padded where the model allows, verified on its first such
    batch, else one forward per prompt length), and score the options on copies of the prompts' KV cache,
    ``batch_size`` option rows per forward (``prefix_cache``); without it, or when an option merges with the prompt's
    last token, prompt + option is forwarded for each option, ``batch_size`` options per forward.

    Args:
        model: the model.
        processor (transformers.ProcessorMixin): its processor.
        benchmark: a choice benchmark.
        batch_size: items (or options) per forward.
        fast_path: score single-token options from one batched forward of the prompts.
        shared_prefix: on the fast and prompt-cache paths, encode the prompts' shared preamble once per batch.
        prefix_cache: score longer options on copies of the prompt's KV cache.
        progress: show a progress bar.

    Returns:
        The benchmark's result (% correct, chance level, per-item log-probs).
    """
    results: dict[str, ItemResult] = {}
    merged = 0
    with inference(model), tqdm(total=len(benchmark), desc=benchmark.name, disable=not progress) as bar:
        for window in _chunks(benchmark.items, batch_size):
            plans = [_plan_choice(processor, item) for item in window]
            merged += sum(p.merged for p in plans)
            fast = [p for p in plans if fast_path and p.single_token]
            for group in _by_modality(fast, lambda p: p.image is not None):
                for plan, scores in zip(group, _fast_scores(model, processor, group, shared_prefix)):
                    results[plan.item.id] = _choice_item(plan, scores)
            shared = [p for p in plans if prefix_cache and not p.merged and p.item.id not in results]
            for group in _prefix_groups(shared):
                scored = _padded_prefix_scores(model, processor, group, batch_size, shared_prefix)
                for plan, scores in zip(group, scored or []):
                    results[plan.item.id] = _choice_item(plan, scores)
            for plan in plans:
                if plan.item.id not in results:
                    results[plan.item.id] = _choice_item(plan, _general_scores(model, processor, plan, batch_size))
            bar.update(len(window))
    if merged:
        log.warning("%s: in %d of %d items an option merges with the prompt's last token(s) when appended; "
                    "those options are scored from the first differing token", benchmark.name, merged, len(benchmark))
    items = [results[item.id] for item in benchmark.items]
    chance = 100.0 * sum(1.0 / len(item.options) for item in benchmark.items) / len(benchmark)
    return _result(benchmark, items, chance=chance, metrics_={"merged_items": float(merged)})


def _result(benchmark: Benchmark, items: list[ItemResult], chance: float | None = None,
            metrics_: dict[str, float] | None = None) -> BenchmarkResult:
    score = 100.0 * sum(i.score for i in items) / len(items)
    log.info("%s (%s, n=%d): %.2f", benchmark.name, benchmark.kind, len(items), score)
    return BenchmarkResult(benchmark.name, benchmark.kind, len(items), score, chance, metrics_ or {}, items)


# -- open answers ----------------------------------------------------------------------------------


def _generate(model: nn.Module, processor, items: list[OpenItem], max_new_tokens: int) -> list[str]:
    """Greedy answers for items that all have an image, or all have none (left-padded batch)."""
    images = [open_image(i.image) for i in items if i.image is not None]
    prompts = [build_prompt(processor, i.question, i.image is not None) for i in items]
    return [text.strip() for text in greedy_generate(model, processor, prompts, images, max_new_tokens)]


def score_open(model: nn.Module, processor, benchmark: Benchmark, *, batch_size: int = 8, max_new_tokens: int = 8,
               progress: bool = True) -> BenchmarkResult:
    """Open answers by greedy generation and :func:`metrics.vqa_accuracy` against the references.

    Args:
        model: the model.
        processor (transformers.ProcessorMixin): its processor.
        benchmark: an open benchmark.
        batch_size: items per generate call.
        max_new_tokens: answer length.
        progress: show a progress bar.

    Returns:
        The benchmark's result (% VQA accuracy, the generated answers).
    """
    results: dict[str, ItemResult] = {}
    with inference(model), tqdm(total=len(benchmark), desc=benchmark.name, disable=not progress) as bar:
        for window in _chunks(benchmark.items, batch_size):
            for group in _by_modality(list(window), lambda i: i.image is not None):
                for item, answer in zip(group, _generate(model, processor, group, max_new_tokens)):
                    results[item.id] = ItemResult(item.id, answer, metrics.vqa_accuracy(answer, item.answers),
                                                  {"normalized": metrics.normalize_answer(answer)})
            bar.update(len(window))
    return _result(benchmark, [results[item.id] for item in benchmark.items])


# -- text fidelity ---------------------------------------------------------------------------------


@dataclass
class ReferenceText:
    """The dense model's view of one text: its token ids (T,) and next-token distributions."""

    ids: torch.Tensor
    distribution: metrics.ReferenceDistribution


@dataclass
class FidelityReference:
    """Dense next-token distributions of every text of some fidelity benchmarks, on the CPU.

    Args:
        texts: benchmark name -> item id -> :class:`ReferenceText`.
        top_k: how many log-probs are kept per position (None: the full vocabulary).
        source: what it was computed from, as its caller fingerprints it (e.g. a study's setup), kept by
            :meth:`save` so a stored reference can be matched to its model and benchmarks (None: not recorded).
    """

    texts: dict[str, dict[str, ReferenceText]]
    top_k: int | None
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")

    def check_covers(self, benchmark: Benchmark) -> None:
        """Raise BenchmarkError unless every text of ``benchmark`` has a reference."""
        held = self.texts.get(benchmark.name)
        if held is None:
            raise BenchmarkError(f"the fidelity reference has no benchmark {benchmark.name!r} (it has "
                                 f"{sorted(self.texts)}); build it with fidelity_reference(dense_model, processor, "
                                 "benchmarks) over the same benchmarks")
        missing = [item.id for item in benchmark.items if item.id not in held]
        if missing:
            raise BenchmarkError(f"the fidelity reference of {benchmark.name!r} lacks items {missing[:5]} "
                                 f"({len(missing)} in all); rebuild it from this benchmark file")

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (torch.save of plain tensors; reload with :meth:`load`)."""
        payload = {"top_k": self.top_k, "source": self.source, "texts": {
            name: {item_id: {"ids": ref.ids, **vars(ref.distribution)} for item_id, ref in texts.items()}
            for name, texts in self.texts.items()}}
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "FidelityReference":
        payload = torch.load(Path(path), weights_only=True)
        texts = {name: {item_id: ReferenceText(entry.pop("ids"), metrics.ReferenceDistribution(**entry))
                        for item_id, entry in held.items()} for name, held in payload["texts"].items()}
        return cls(texts, payload["top_k"], payload.get("source"))


def _text_rows(model: nn.Module, processor, items: Sequence[TextItem]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded forward of raw texts (no chat template): per text (ids (T,), logits (T, V))."""
    return forward_rows(model, encode(processor, [i.text for i in items], None, "right"))


def fidelity_reference(dense_model: nn.Module, processor, benchmarks: Benchmarks, *, top_k: int | None = DEFAULT_TOP_K,
                       batch_size: int = 8, progress: bool = True) -> FidelityReference:
    """Run the dense model once over the texts of the fidelity benchmarks among ``benchmarks`` and keep
    its next-token distributions on the CPU, so pruned variants can be scored without it.

    Memory: T x top_k x 12 bytes per text (T x V x 4 with ``top_k=None``). With a top-k reference
    the KL is computed over the dense top-k tokens plus one bucket for the rest of the mass (see
    :func:`metrics.kl_to_reference`); top-1 agreement is exact either way.

    Args:
        dense_model: the dense model.
        processor (transformers.ProcessorMixin): its processor.
        benchmarks: benchmarks (objects or JSONL paths); only the fidelity ones are read.
        top_k: log-probs kept per position (None: the full vocabulary).
        batch_size: texts per forward.
        progress: show a progress bar.

    Returns:
        The reference, for :func:`evaluate` and :func:`score_fidelity`.
    """
    fidelity = [b for b in _as_benchmarks(benchmarks) if b.kind == FIDELITY]
    if not fidelity:
        raise BenchmarkError("fidelity_reference needs at least one fidelity benchmark (items with 'text')")
    texts: dict[str, dict[str, ReferenceText]] = {}
    with inference(dense_model):
        for bench in fidelity:
            held = texts.setdefault(bench.name, {})
            for chunk in tqdm(list(_chunks(bench.items, batch_size)), desc=f"{bench.name} (reference)",
                              disable=not progress):
                for item, (ids, logits) in zip(chunk, _text_rows(dense_model, processor, chunk)):
                    held[item.id] = ReferenceText(ids.cpu(), metrics.reference_distribution(logits, top_k))
    return FidelityReference(texts, top_k)


def score_fidelity(model: nn.Module, processor, benchmark: Benchmark, reference: FidelityReference, *,
                   batch_size: int = 8, progress: bool = True) -> BenchmarkResult:
    """Top-1 agreement (%) with the dense model over every position of every text (the score) and mean
    KL(dense || model) (``metrics["kl"]``); each text weighs the same (per-text means, then averaged).

    Args:
        model: the model.
        processor (transformers.ProcessorMixin): its processor.
        benchmark: a fidelity benchmark.
        reference: the dense reference holding this benchmark's texts.
        batch_size: texts per forward.
        progress: show a progress bar.

    Returns:
        The benchmark's result.
    """
    reference.check_covers(benchmark)
    held = reference.texts[benchmark.name]
    items: list[ItemResult] = []
    with inference(model):
        for chunk in tqdm(list(_chunks(benchmark.items, batch_size)), desc=benchmark.name, disable=not progress):
            for item, (ids, logits) in zip(chunk, _text_rows(model, processor, chunk)):
                ref = held[item.id]
                if not torch.equal(ids.cpu(), ref.ids):
                    raise BenchmarkError(f"{benchmark.name!r} item {item.id!r}: tokenised to {len(ids)} tokens, the "
                                         f"reference to {len(ref.ids)} (or other ids); use the same processor for both")
                kl = metrics.kl_to_reference(ref.distribution, logits).mean()
                agree = metrics.top1_agreement(ref.distribution, logits).float().mean()
                items.append(ItemResult(item.id, None, float(agree), {"kl": float(kl), "tokens": len(ids)}))
    mean_kl = sum(i.details["kl"] for i in items) / len(items)
    return _result(benchmark, items, metrics_={"kl": mean_kl})


# -- top level -------------------------------------------------------------------------------------


def _as_benchmarks(benchmarks: Benchmarks) -> list[Benchmark]:
    """A benchmark, a path, or a sequence of either -> loaded benchmarks."""
    if isinstance(benchmarks, (Benchmark, str, Path)):
        benchmarks = [benchmarks]
    return [b if isinstance(b, Benchmark) else load_benchmark(b) for b in benchmarks]


def _check_request(benchmarks: list[Benchmark], processor, reference: FidelityReference | None,
                   batch_size: int, max_new_tokens: int) -> None:
    """Everything that can be checked before any model work."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if not benchmarks:
        raise BenchmarkError("evaluate needs at least one benchmark, got none")
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"benchmark names must be unique (they key the report), got {names}")
    if any(b.kind in (CHOICE, OPEN) for b in benchmarks) and getattr(processor, "chat_template", None) is None:
        raise BenchmarkError(f"the processor {type(processor).__name__} has no chat template; question items need "
                             "one (set processor.chat_template)")
    for bench in benchmarks:
        if bench.kind == FIDELITY:
            if reference is None:
                raise BenchmarkError(f"benchmark {bench.name!r} measures fidelity to a dense model: pass "
                                     "reference=fidelity_reference(dense_model, processor, benchmarks)")
            reference.check_covers(bench)


def evaluate(model: nn.Module, processor, benchmarks: Benchmarks, *, reference: FidelityReference | None = None,
             batch_size: int = 8, max_new_tokens: int = 8, progress: bool = True, seed: int = 0,
             return_items: bool = False) -> EvalReport:
    """Score ``model`` on each benchmark (objects or JSONL paths), in order.

    Choice benchmarks by option log-likelihood, open ones by greedy generation (``max_new_tokens``),
    fidelity ones against ``reference`` (from :func:`fidelity_reference`). Inputs, the reference and
    the arguments are all checked before the first forward.

    Args:
        model: the model to score: plain, pruned or a probe.
        processor (transformers.ProcessorMixin): its processor.
        benchmarks: :class:`Benchmark` objects or paths of JSONL files.
        reference: the dense reference, needed when a fidelity benchmark is among ``benchmarks``.
        batch_size: items per forward.
        max_new_tokens: answer length on open benchmarks.
        progress: show progress bars.
        seed: the evaluation's seed (recorded in the report).
        return_items: keep per-item results (needed for bootstrap intervals).

    Returns:
        One result per benchmark, in the given order.

    Raises:
        BenchmarkError: a benchmark that cannot be read, or a fidelity benchmark without a matching reference.
    """
    benches = _as_benchmarks(benchmarks)
    _check_request(benches, processor, reference, batch_size, max_new_tokens)
    torch.manual_seed(seed)
    results = []
    for bench in benches:
        if bench.kind == CHOICE:
            result = score_choice(model, processor, bench, batch_size=batch_size, progress=progress)
        elif bench.kind == OPEN:
            result = score_open(model, processor, bench, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                progress=progress)
        else:
            result = score_fidelity(model, processor, bench, reference, batch_size=batch_size, progress=progress)
        if not return_items:
            result.items = None
        results.append(result)
    return EvalReport(results, seed=seed)


__all__ = ["DEFAULT_TOP_K", "FidelityReference", "ReferenceText", "evaluate", "fidelity_reference", "score_choice",
           "score_fidelity", "score_open"]
