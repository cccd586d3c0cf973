"""Choice scoring with the prompts' shared preamble encoded once per batch: the same predictions and
log-likelihoods as item-by-item scoring of whole prompts, the preamble cut before the first image
placeholder, and a family whose forward cannot take a text-only cache keeps whole-prompt forwards."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny
from tiny_processors import make_processor

from evaluation import harness, load_benchmark, model_io, score_choice
from evaluation.harness import shared_prefix_length

TOL = 1e-5
PREAMBLE = "<|system|> describe the image it is a cat <|end|> "  # 9 tokens every prompt starts with
ITEMS = [  # single-token options (the fast path) and multi-token ones (the prompt cache), two prompt lengths
    {"id": f"i{i}", "image": f"images/{i % 3}.png", "question": "what is shown" + " here" * (i % 2),
     "options": ["one", "two", "three"] if i < 4 else ["red cat", "blue dog", "two"], "answer": "two"}
    for i in range(8)
] + [{"id": "t", "image": None, "question": "what is a cat", "options": ["one", "two"], "answer": "one"},
     {"id": "u", "image": None, "question": "what is a dog", "options": ["one", "two"], "answer": "two"}]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharing")
    (path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path / "images" / f"{i}.png")
    (path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ITEMS) + "\n", encoding="utf-8")
    return load_benchmark(path / "b.jsonl")


def _with_preamble(family: str):
    model, _ = build_tiny(family)
    processor = copy.deepcopy(make_processor(family, model))
    processor.chat_template = PREAMBLE + processor.chat_template
    return model, processor


def _spy_prefixes(monkeypatch) -> list[int]:
    """Record the prefix of every last_logits call the harness makes."""
    seen: list[int] = []
    real = model_io.last_logits

    def spy(model, inputs, prefix=0, return_cache=False):
        seen.append(prefix)
        return real(model, inputs, prefix, return_cache)

    monkeypatch.setattr(harness, "last_logits", spy)
    return seen


def _same_scores(a, b) -> None:
    for x, y in zip(a.items, b.items, strict=True):
        assert x.prediction == y.prediction, x.id
        assert x.details["logprobs"] == pytest.approx(y.details["logprobs"], abs=TOL), x.id


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_shared_preamble_scores_equal_item_by_item_whole_prompts(family, bench, monkeypatch):
    model, processor = _with_preamble(family)
    one = score_choice(model, processor, bench, batch_size=1, shared_prefix=False, progress=False)
    seen = _spy_prefixes(monkeypatch)
    shared = score_choice(model, processor, bench, batch_size=8, progress=False)
    assert harness._SHARING_VERIFIED.get(model) == {True: True, False: True}
    # image rows share the preamble and the user tag (10 tokens) and differ from the image placeholder on; the two
    # text-only rows also share "what is a" (13); the two 0s are the whole-prompt passes that verify the first
    # image batch and the first text-only batch; the multi-token image items have two prompt lengths: one prompt
    # pass per length, and one padded pass that verifies padding (three 10s besides the single-token batch's)
    assert sorted(seen) == [0, 0, 10, 10, 10, 10, 13]
    _same_scores(shared, one)


def test_a_model_that_keeps_position_state_never_shares(bench, monkeypatch):
    """Qwen2-VL keeps M-RoPE deltas between calls (a later batch's positions on a cache depend on an earlier
    call): it scores whole prompts only, without trying."""
    model, processor = _with_preamble("qwen2_vl")
    one = score_choice(model, processor, bench, batch_size=1, shared_prefix=False, progress=False)
    seen = _spy_prefixes(monkeypatch)
    shared = score_choice(model, processor, bench, batch_size=8, progress=False)
    _same_scores(shared, one)
    assert harness._SHARING_VERIFIED.get(model) == {True: False, False: False}
    assert set(seen) == {0}


def test_a_family_whose_forward_cannot_share_keeps_whole_prompts(bench, monkeypatch):
    """Without the state check, Qwen2-VL's forward shows on the first batch that it cannot continue a text-only
    cache into an image (M-RoPE positions come from the whole prompt): whole prompts, the same scores."""
    model, processor = _with_preamble("qwen2_vl")
    one = score_choice(model, processor, bench, batch_size=1, shared_prefix=False, progress=False)
    harness._SHARING_VERIFIED[model] = {}  # as if the model kept no state
    shared = score_choice(model, processor, bench, batch_size=8, progress=False)
    _same_scores(shared, one)
    assert harness._SHARING_VERIFIED.get(model)[True] is False


def test_a_shared_pass_that_fails_after_verification_falls_back(bench, monkeypatch):
    model, processor = _with_preamble("llava")
    one = score_choice(model, processor, bench, batch_size=1, shared_prefix=False, progress=False)
    real = model_io.last_logits
    calls = {"shared": 0}

    def fails_later(model_, inputs, prefix=0, return_cache=False):
        if prefix:
            calls["shared"] += 1
            if calls["shared"] > 1:  # the verifying pass works, the next shared pass fails
                raise RuntimeError("state from an earlier call")
        return real(model_, inputs, prefix, return_cache)

    monkeypatch.setattr(harness, "last_logits", fails_later)
    # batch 8: the single-token image items verify, then the multi-token items' two-row prompt passes fail
    shared = score_choice(model, processor, bench, batch_size=8, progress=False)
    _same_scores(shared, one)
    assert calls["shared"] > 1 and harness._SHARING_VERIFIED.get(model)[True] is False


def test_text_batches_verified_do_not_license_image_batches(bench, monkeypatch):
    """Text-only batches come first and share; the first image batch is verified on its own (here its shared pass
    fails), so image batches keep whole prompts instead of failing mid-benchmark."""
    model, processor = _with_preamble("llava")
    text_first = copy.copy(bench)
    text_first.items = bench.items[-2:] + bench.items[:-2]
    one = score_choice(model, processor, text_first, batch_size=1, shared_prefix=False, progress=False)
    real = model_io.last_logits

    def no_images_on_a_cache(model_, inputs, prefix=0, return_cache=False):
        if prefix and "pixel_values" in inputs:
            raise RuntimeError("image tokens after a cached prefix")
        return real(model_, inputs, prefix, return_cache)

    monkeypatch.setattr(harness, "last_logits", no_images_on_a_cache)
    shared = score_choice(model, processor, text_first, batch_size=2, progress=False)
    _same_scores(shared, one)
    assert harness._SHARING_VERIFIED.get(model) == {False: True, True: False}


def test_a_shared_pass_that_disagrees_is_never_used(bench, monkeypatch):
    """The guard itself: a shared pass off by more than rounding is refused on the first batch and never used."""
    model, processor = _with_preamble("llava")
    one = score_choice(model, processor, bench, batch_size=1, shared_prefix=False, progress=False)
    real = model_io.last_logits

    def skewed(model_, inputs, prefix=0, return_cache=False):
        out = real(model_, inputs, prefix, return_cache)
        if prefix and out is not None:
            logits = (out[0] if return_cache else out).clone()
            logits[:, 0] += 1.0
            return (logits, out[1]) if return_cache else logits
        return out

    monkeypatch.setattr(harness, "last_logits", skewed)
    shared = score_choice(model, processor, bench, batch_size=8, progress=False)
    assert harness._SHARING_VERIFIED.get(model) == {True: False, False: False}
    _same_scores(shared, one)


def test_a_shared_pass_that_raises_falls_back(bench, monkeypatch):
    model, processor = _with_preamble("llava")
    one = score_choice(model, processor, bench, batch_size=1, shared_prefix=False, progress=False)
    real = model_io.last_logits

    def failing(model_, inputs, prefix=0, return_cache=False):
        if prefix:
            raise RuntimeError("no cache for you")
        return real(model_, inputs, prefix, return_cache)

    monkeypatch.setattr(harness, "last_logits", failing)
    shared = score_choice(model, processor, bench, batch_size=8, progress=False)
    assert harness._SHARING_VERIFIED.get(model) == {True: False, False: False}
    _same_scores(shared, one)


PADDED = [  # multi-token options, prompts of four lengths, with and without an image
    {"id": f"p{i}", "image": f"images/{i % 3}.png" if i % 2 else None,
     "question": "what is shown" + " here" * (i % 4), "options": ["red cat", "blue dog", "two"], "answer": "two"}
    for i in range(10)
]


@pytest.fixture(scope="module")
def padded(bench):
    path = bench.path.parent / "padded.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PADDED) + "\n", encoding="utf-8")
    return load_benchmark(path)


def _prompt_passes(monkeypatch) -> list[int]:
    """The rows of every prompt pass of the prompt-cache path."""
    rows: list[int] = []
    real = harness._prefix_scores

    def spy(model, processor, plans, *args):
        rows.append(len(plans))
        return real(model, processor, plans, *args)

    monkeypatch.setattr(harness, "_prefix_scores", spy)
    return rows


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_prompts_of_unequal_length_share_one_padded_pass_with_item_by_item_scores(family, padded, monkeypatch):
    model, processor = _with_preamble(family)
    one = score_choice(model, processor, padded, batch_size=1, shared_prefix=False, prefix_cache=False,
                       progress=False)
    rows = _prompt_passes(monkeypatch)
    first = score_choice(model, processor, padded, batch_size=10, progress=False)
    assert harness._PADDING_VERIFIED.get(model) == {True: True, False: True}
    # per modality: one pass per prompt length (2 lengths each), then one padded pass that verifies
    assert sorted(rows) == [2, 2, 3, 3, 5, 5]
    rows.clear()
    again = score_choice(model, processor, padded, batch_size=10, progress=False)
    assert rows == [5, 5]  # verified: one padded prompt pass per modality
    _same_scores(first, one)
    _same_scores(again, one)


def test_a_model_that_keeps_position_state_never_pads(padded, monkeypatch):
    """Qwen2-VL scores one prompt pass per length; its text-only items, scored on a cache after image items, are
    placed with their own positions (the M-RoPE deltas an image prompt left are dropped first: they moved these
    log-probs by 1.7e-3 before)."""
    model, processor = _with_preamble("qwen2_vl")
    one = score_choice(model, processor, padded, batch_size=1, prefix_cache=False, progress=False)
    rows = _prompt_passes(monkeypatch)
    scored = score_choice(model, processor, padded, batch_size=10, progress=False)
    assert harness._PADDING_VERIFIED.get(model) == {True: False, False: False}
    assert sorted(rows) == [2, 2, 3, 3]  # one prompt pass per length and modality, never a padded one
    _same_scores(scored, one)


def test_a_padded_pass_that_disagrees_is_never_used(padded, monkeypatch):
    model, processor = _with_preamble("llava")
    one = score_choice(model, processor, padded, batch_size=1, shared_prefix=False, prefix_cache=False,
                       progress=False)
    real = harness._continuation_scores

    def skewed(model_, processor_, plans, first, cache, offset, prompt_mask):
        scores = real(model_, processor_, plans, first, cache, offset, prompt_mask)
        padded_rows = bool((prompt_mask.sum(1) < prompt_mask.shape[1]).any())
        return [[s + 0.5 for s in row] for row in scores] if padded_rows else scores

    monkeypatch.setattr(harness, "_continuation_scores", skewed)
    rows = _prompt_passes(monkeypatch)
    scored = score_choice(model, processor, padded, batch_size=10, progress=False)
    scored_again = score_choice(model, processor, padded, batch_size=10, progress=False)
    assert harness._PADDING_VERIFIED.get(model) == {True: False, False: False}
    assert sorted(rows) == sorted([2, 3, 5, 2, 3, 5] + [2, 3, 2, 3])  # verified once, then per length
    _same_scores(scored, one)
    _same_scores(scored_again, one)


def test_a_padded_pass_that_fails_after_verification_falls_back(padded, monkeypatch, caplog):
    model, processor = _with_preamble("llava")
    one = score_choice(model, processor, padded, batch_size=1, shared_prefix=False, prefix_cache=False,
                       progress=False)
    score_choice(model, processor, padded, batch_size=10, progress=False)  # verifies padding for both modalities
    real = harness._continuation_scores

    def fails_padded(model_, processor_, plans, first, cache, offset, prompt_mask):
        if bool((prompt_mask.sum(1) < prompt_mask.shape[1]).any()):
            raise RuntimeError("positions out of range")
        return real(model_, processor_, plans, first, cache, offset, prompt_mask)

    monkeypatch.setattr(harness, "_continuation_scores", fails_padded)
    scored = score_choice(model, processor, padded, batch_size=10, progress=False)
    assert harness._PADDING_VERIFIED.get(model) == {True: False, False: False}
    assert "padded prompt pass failed after it was verified" in caplog.text
    _same_scores(scored, one)


def _batch(rows: list[list[int]], pad: int = 0) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}


@pytest.mark.parametrize(("rows", "placeholders", "expected"), [
    ([[5, 6, 7, 9, 1], [5, 6, 7, 9, 2]], {9}, 3),      # cut before the placeholder
    ([[5, 6, 7, 8, 1], [5, 6, 7, 8, 2]], set(), 4),    # no placeholder: up to where the rows differ
    ([[5, 6, 7, 8], [5, 6, 7, 8]], set(), 3),          # equal rows: each keeps one token of its own
    ([[5, 6], [5, 6, 7, 8]], set(), 1),                # the shortest row keeps its last token
    ([[5, 6, 7, 8]], set(), 0),                        # one row: nothing to share
    ([[9, 6, 7], [9, 6, 8]], {9}, 0),                  # the image comes first
    ([[4, 6, 7], [5, 6, 7]], set(), 0),                # differ at once
])
def test_shared_prefix_length_by_hand(rows, placeholders, expected):
    assert shared_prefix_length(_batch(rows), placeholders) == expected


def test_placeholder_ids_come_from_the_configs_and_the_processor():
    model, processor = _with_preamble("llava")
    found = harness._placeholder_ids(model, processor)
    assert model.config.image_token_id in found
    assert processor.tokenizer.convert_tokens_to_ids("<image>") in found
    assert processor.tokenizer.convert_tokens_to_ids("<|system|>") not in found


def test_last_logits_refuses_a_left_padded_batch():
    model, _ = build_tiny("llava")
    batch = _batch([[5, 6, 7], [5, 6]])
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"].flip(1), batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model_io.last_logits(model, batch)


def test_last_logits_equal_the_full_forward_at_each_last_token():
    model, _ = build_tiny("llava")
    batch = _batch([[5, 6, 7, 8, 9], [5, 6, 7], [5, 6, 7, 8]])
    with torch.no_grad():
        full = model(**batch).logits
        last = model_io.last_logits(model, batch)
        shared = model_io.last_logits(model, batch, prefix=2)
    expected = torch.stack([full[0, 4], full[1, 2], full[2, 3]])
    torch.testing.assert_close(last, expected, rtol=0, atol=TOL)
    torch.testing.assert_close(shared, expected, rtol=0, atol=TOL)
