"""Evaluation harness on a tiny random LLaVA: hand-checked log-likelihoods, padding invariance,
greedy answers, fidelity to a dense reference, normalisation, retention and every bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny
from tiny_processors import WORDS, make_processor

from evaluation import (
    Benchmark,
    BenchmarkError,
    BenchmarkResult,
    ChoiceItem,
    EvalReport,
    FidelityReference,
    ItemResult,
    TextItem,
    build_prompt,
    evaluate,
    fidelity_reference,
    load_benchmark,
    metrics,
    normalize_answer,
    retention,
    score_choice,
    score_fidelity,
    score_open,
    vqa_accuracy,
)

TOL = 1e-5  # different batch shapes change float summation order, not the result beyond this


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny("llava")
    return model, make_processor("llava", model)


@pytest.fixture(scope="module")
def talker(tiny):
    """The tiny model with its LM head restricted to the tokenizer's words, so greedy answers are words."""
    model, processor = tiny
    model = copy.deepcopy(model)
    words = processor.tokenizer.convert_tokens_to_ids(list(WORDS))
    keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
    keep[words] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0
        model.lm_head.weight[keep] *= 50
    return model, processor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    (path / "images").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path / "images" / f"{i}.png")
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


MIXED_CHOICE = [  # single- and multi-token options, prompts of different lengths, one text-only item
    {"id": "a", "image": "images/0.png", "question": "what is shown", "options": ["one", "two", "three"],
     "answer": "two"},
    {"id": "b", "image": "images/1.png", "question": "what is shown here", "options": ["red cat", "blue dog", "cat"],
     "answer": "cat"},
    {"id": "c", "image": None, "question": "what is it", "options": ["yes", "no"], "answer": "no"},
    {"id": "d", "image": "images/2.png", "question": "describe the image", "options": ["a red dog", "two"],
     "answer": "two"},
    {"id": "e", "image": "images/3.png", "question": "is it red", "options": ["yes", "no"], "answer": "yes"},
]
SINGLE_CHOICE = [r for r in MIXED_CHOICE if r["id"] in ("a", "c", "e")]
TEXTS = [{"id": "t0", "text": "a red cat is shown here"}, {"id": "t1", "text": "what is the image"},
         {"id": "t2", "text": "two blue dog describe it yes no one three the cat"}]


@pytest.fixture(scope="module")
def mixed(folder):
    return load_benchmark(write_jsonl(folder / "mixed.jsonl", MIXED_CHOICE))


@pytest.fixture(scope="module")
def texts(folder):
    return load_benchmark(write_jsonl(folder / "texts.jsonl", TEXTS))


# -- multiple choice -------------------------------------------------------------------------------


def test_load_benchmark_resolves_images_and_kind(mixed, folder):
    assert (mixed.name, mixed.kind, len(mixed)) == ("mixed", "choice", 5)
    assert mixed.items[0].image == folder / "images" / "0.png" and mixed.items[2].image is None


def test_multi_token_option_loglik_equals_manual_computation(tiny, mixed):
    model, processor = tiny
    item = mixed.items[1]  # "red cat" is two tokens
    result = score_choice(model, processor, Benchmark("one", "choice", [item]), progress=False)
    image = Image.open(item.image).convert("RGB")
    prompt = build_prompt(processor, item.question, with_image=True)
    n_prompt = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    full = processor(images=[image], text=[prompt + "red cat"], return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(model(**full).logits[0].float(), -1)
    ids = full["input_ids"][0]
    assert len(ids) == n_prompt + 2
    manual = float(logp[n_prompt - 1, ids[n_prompt]] + logp[n_prompt, ids[n_prompt + 1]])
    assert result.items[0].details["logprobs"][0] == pytest.approx(manual, abs=TOL)
    assert result.items[0].details["continuation_tokens"] == [2, 2, 1]


def test_option_merging_with_prompt_is_scored_from_first_differing_token(tiny, mixed, caplog):
    model, processor = tiny
    glued = copy.deepcopy(processor)  # no space after the generation prompt: "<|assistant|>cat" is one unknown word
    glued.chat_template = processor.chat_template.replace("<|assistant|> {% endif %}", "<|assistant|>{% endif %}")
    item = ChoiceItem("m", "what is shown", ("cat", "dog cat"), "cat", mixed.items[0].image)
    with caplog.at_level("WARNING", logger="evaluation.harness"):
        result = score_choice(model, glued, Benchmark("glued", "choice", [item]), progress=False)
    assert "1 of 1 items an option merges with the prompt" in caplog.text
    assert result.metrics == {"merged_items": 1.0}
    image = Image.open(item.image).convert("RGB")
    prompt = build_prompt(glued, item.question, with_image=True)
    n_prompt = glued(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    full = glued(images=[image], text=[prompt + "dog cat"], return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(model(**full).logits[0], -1)
    ids = full["input_ids"][0]
    assert len(ids) == n_prompt + 1  # "<|assistant|>" became "[UNK]", then "cat"
    manual = float(logp[n_prompt - 2, ids[n_prompt - 1]] + logp[n_prompt - 1, ids[n_prompt]])
    assert result.items[0].details["continuation_tokens"] == [1, 2]
    assert result.items[0].details["logprobs"][1] == pytest.approx(manual, abs=TOL)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_single_token_fast_path_and_prefix_cache_equal_general_path(tiny, folder):
    model, processor = tiny
    bench = load_benchmark(write_jsonl(folder / "single.jsonl", SINGLE_CHOICE))
    calls, handle = _count_forwards(model)
    try:
        fast = score_choice(model, processor, bench, batch_size=8, progress=False)
        n_fast = len(calls)
        prefix = score_choice(model, processor, bench, batch_size=8, fast_path=False, progress=False)
        n_prefix = len(calls) - n_fast
        general = score_choice(model, processor, bench, batch_size=8, fast_path=False, prefix_cache=False,
                               progress=False)
        n_general = len(calls) - n_fast - n_prefix
    finally:
        handle.remove()
    assert n_fast == 2  # one forward for the two items with an image, one for the text-only item
    assert n_prefix == 6  # per item: its prompt, then all its options on the cached prompt
    assert n_general == 3  # one forward per item (its options batched)
    for f, c, g in zip(fast.items, prefix.items, general.items):
        assert f.prediction == c.prediction == g.prediction
        assert f.details["logprobs"] == pytest.approx(g.details["logprobs"], abs=TOL)
        assert c.details["logprobs"] == pytest.approx(g.details["logprobs"], abs=TOL)


def test_prefix_cache_encodes_a_batch_of_prompts_once_and_options_batch_size_rows_at_a_time(tiny, folder):
    model, processor = tiny
    same = [{"id": f"s{i}", "image": f"images/{i % 3}.png", "question": "what is shown",
             "options": ["red cat", "blue dog", "two"], "answer": "two"} for i in range(5)]
    bench = load_benchmark(write_jsonl(folder / "same.jsonl", same))
    rows = []
    handle = model.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        cached = score_choice(model, processor, bench, batch_size=6, shared_prefix=False, progress=False)
    finally:
        handle.remove()
    # 5 prompts in one forward, then 6 // 3 = 2 items' options (6 rows) per forward: 2 + 2 + 1 items
    assert rows == [5, 6, 6, 3]
    full = score_choice(model, processor, bench, batch_size=6, prefix_cache=False, progress=False)
    for c, f in zip(cached.items, full.items):
        assert c.prediction == f.prediction
        assert c.details["logprobs"] == pytest.approx(f.details["logprobs"], abs=TOL)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_prefix_cache_scores_multi_token_options_like_full_forwards(family, folder):
    model, _ = build_tiny(family)
    processor = make_processor(family, model)
    bench = load_benchmark(write_jsonl(folder / f"multi-{family}.jsonl", MIXED_CHOICE))
    cached = score_choice(model, processor, bench, batch_size=4, progress=False)
    full = score_choice(model, processor, bench, batch_size=4, prefix_cache=False, progress=False)
    assert [i.details["continuation_tokens"] for i in cached.items][1] == [2, 2, 1]
    for c, f in zip(cached.items, full.items):
        assert c.prediction == f.prediction
        assert c.details["logprobs"] == pytest.approx(f.details["logprobs"], abs=TOL)


def test_batch_size_does_not_change_choice_scores(tiny, mixed):
    model, processor = tiny
    one = score_choice(model, processor, mixed, batch_size=1, progress=False)
    processor.tokenizer.padding_side = "left"  # as Qwen's tokenizers: scoring must still right-pad
    try:
        four = score_choice(model, processor, mixed, batch_size=4, progress=False)
        assert processor.tokenizer.padding_side == "left"
    finally:
        processor.tokenizer.padding_side = "right"
    assert one.score == four.score
    for a, b in zip(one.items, four.items):
        assert a.prediction == b.prediction
        assert a.details["logprobs"] == pytest.approx(b.details["logprobs"], abs=TOL)


def test_choice_score_chance_and_prediction_is_argmax(tiny, mixed):
    model, processor = tiny
    result = score_choice(model, processor, mixed, progress=False)
    for item, out in zip(mixed.items, result.items):
        scores = out.details["logprobs"]
        assert out.prediction == item.options[scores.index(max(scores))]
        assert out.score == float(out.prediction == item.answer)
    assert result.score == pytest.approx(100 * sum(i.score for i in result.items) / 5)
    assert result.chance == pytest.approx(100 * (1 / 3 + 1 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 5)


def test_evaluate_restores_training_mode_and_needs_no_grad(tiny, mixed):
    model, processor = tiny
    model.train()
    try:
        report = evaluate(model, processor, [mixed], progress=False)
    finally:
        assert model.training
        model.eval()
    assert report["mixed"].items is None and report.scores()["mixed"] == report["mixed"].score


# -- open answers ----------------------------------------------------------------------------------

OPEN = [{"id": "o0", "image": "images/0.png", "question": "what is shown", "answers": ["cat"]},
        {"id": "o1", "image": "images/1.png", "question": "what is shown here a cat dog", "answers": ["dog"]},
        {"id": "o2", "image": None, "question": "is it red", "answers": ["yes"]},
        {"id": "o3", "image": "images/2.png", "question": "describe", "answers": ["two", "2", "two"]}]


def test_greedy_answer_is_argmax_word(talker, folder):
    model, processor = talker
    bench = load_benchmark(write_jsonl(folder / "open.jsonl", OPEN))
    result = score_open(model, processor, bench, max_new_tokens=1, progress=False)
    for item, out in zip(bench.items, result.items):
        image = [Image.open(item.image).convert("RGB")] if item.image else None
        inputs = processor(images=image, text=[build_prompt(processor, item.question, image is not None)],
                           return_tensors="pt")
        with torch.no_grad():
            best = int(model(**inputs).logits[0, -1].argmax())
        assert out.prediction == processor.tokenizer.convert_ids_to_tokens(best)
        assert out.score == vqa_accuracy(out.prediction, item.answers)


def test_generation_is_the_same_left_padded(talker, folder):
    model, processor = talker
    bench = load_benchmark(write_jsonl(folder / "open.jsonl", OPEN))
    one = score_open(model, processor, bench, batch_size=1, max_new_tokens=4, progress=False)
    four = score_open(model, processor, bench, batch_size=4, max_new_tokens=4, progress=False)
    predictions = [i.prediction for i in one.items]
    assert all(len(p.split()) >= 2 for p in predictions)  # real multi-word answers
    assert predictions == [i.prediction for i in four.items]


@pytest.mark.parametrize("raw, normal", [
    ("Two.", "2"), ("the cat", "cat"), ("A Dog!", "dog"), ("  Yes ", "yes"), ("3.5", "3.5"),
    ("1,000", "1000"), ("dog's", "dogs"), ("red-blue", "red blue"), ("ten apples", "10 apples"), ("an", ""),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_accuracy():
    three = ["two", "2", "three"]
    assert vqa_accuracy("Two.", three) == pytest.approx(2 / 3)  # two annotators said 2
    assert vqa_accuracy("three", three) == pytest.approx(1 / 3)
    assert vqa_accuracy("4", three) == 0.0
    assert vqa_accuracy("2", ["2", "two", "2", "1"]) == 1.0  # three matches: full credit
    assert vqa_accuracy("seven", ["7", "seven"]) == 1.0  # fewer than 3: alternatives, any match counts
    assert vqa_accuracy("the cat", ["cat"]) == 1.0 and vqa_accuracy("cats", ["cat"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


# -- text fidelity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 8])
def test_fidelity_of_model_to_itself(tiny, texts, top_k):
    model, processor = tiny
    reference = fidelity_reference(model, processor, [texts], top_k=top_k, batch_size=2, progress=False)
    result = score_fidelity(model, processor, texts, reference, batch_size=3, progress=False)
    assert result.score == 100.0
    assert result.metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_fidelity_of_perturbed_model_matches_manual_kl(tiny, texts):
    model, processor = tiny
    noisy = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        noisy.lm_head.weight.add_(torch.randn_like(noisy.lm_head.weight) * 0.5)
    full = fidelity_reference(model, processor, texts, top_k=None, progress=False)
    top = fidelity_reference(model, processor, texts, top_k=4, progress=False)
    exact = score_fidelity(noisy, processor, texts, full, progress=False)
    coarse = score_fidelity(noisy, processor, texts, top, progress=False)
    per_text, agree = [], []
    for item in texts.items:
        inputs = processor.tokenizer([item.text], return_tensors="pt")
        with torch.no_grad():
            p = torch.log_softmax(model(**inputs).logits[0], -1)
            q = torch.log_softmax(noisy(**inputs).logits[0], -1)
        per_text.append(float((p.exp() * (p - q)).sum(-1).mean()))
        agree.append(float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    assert exact.metrics["kl"] == pytest.approx(sum(per_text) / 3, abs=1e-5) and exact.metrics["kl"] > 1e-3
    assert exact.score == pytest.approx(100 * sum(agree) / 3) and exact.score < 100
    assert coarse.score == exact.score  # top-1 agreement does not depend on k
    assert 0 < coarse.metrics["kl"] <= exact.metrics["kl"] + 1e-6  # coarse-graining never raises the KL


def test_fidelity_reference_save_load_and_report_json(tiny, texts, mixed, tmp_path):
    model, processor = tiny
    reference = fidelity_reference(model, processor, [mixed, texts], top_k=8, progress=False)
    assert list(reference.texts) == ["texts"]  # non-fidelity benchmarks are skipped
    reference.save(tmp_path / "ref.pt")
    loaded = FidelityReference.load(tmp_path / "ref.pt")
    report = evaluate(model, processor, [mixed, texts], reference=loaded, progress=False, return_items=True)
    assert report["texts"].score == 100.0 and report["texts"].chance is None
    data = json.loads(report.to_json())
    assert [r["name"] for r in data["results"]] == ["mixed", "texts"]
    assert data["results"][0]["items"][0]["id"] == "a"


def test_kl_terms_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    other = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    reference = metrics.reference_distribution(logits, top_k=None)
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert float(metrics.kl_to_reference(reference, other)[0]) == pytest.approx(expected)
    coarse = metrics.reference_distribution(logits, top_k=1)  # buckets {0} and {1, 2}: 0.5/0.5 vs 0.25/0.75
    assert float(metrics.kl_to_reference(coarse, other)[0]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))


# -- reports ---------------------------------------------------------------------------------------


def test_retention_arithmetic():
    report = retention({"a": 30.0, "b": 45.0, "c": 80.0}, {"a": 60.0, "b": 50.0, "c": 80.0})
    assert report.per_benchmark == pytest.approx({"a": 50.0, "b": 90.0, "c": 100.0})
    assert report.mean == pytest.approx(80.0)
    with pytest.raises(ValueError, match="same benchmarks"):
        retention({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="not positive"):
        retention({"a": 1.0}, {"a": 0.0})


def test_report_dataclasses_validate():
    with pytest.raises(ValueError, match="kind must be one of"):
        Benchmark("x", "essay", [TextItem("1", "hi")])
    with pytest.raises(ValueError, match="holds a TextItem"):
        Benchmark("x", "choice", [TextItem("1", "hi")])
    with pytest.raises(ValueError, match=r"score must be in \[0, 1\], got 2"):
        ItemResult("1", None, 2.0)
    with pytest.raises(ValueError, match="answer 'c' is not one of"):
        ChoiceItem("1", "q", ("a", "b"), "c")
    with pytest.raises(ValueError, match=r"percentage in \[0, 100\], got 150"):
        BenchmarkResult("a", "open", 1, 150.0)
    with pytest.raises(ValueError, match="unique"):
        EvalReport([BenchmarkResult("a", "open", 1, 0.0), BenchmarkResult("a", "open", 1, 0.0)])


# -- bad input, caught before any model work -------------------------------------------------------

GOOD = {"id": "g", "image": "images/0.png", "question": "what", "options": ["a", "b"], "answer": "a"}
BAD_LINES = {
    "malformed json": ('{"id": "x", "question": ', "not valid JSON"),
    "not an object": ('["a", "b"]', "JSON object"),
    "unknown kind": ({"id": "x", "question": "q"}, "cannot tell the item kind"),
    "missing id": ({"question": "q", "options": ["a"], "answer": "a"}, "needs the field 'id'"),
    "missing question": ({"id": "x", "options": ["a"], "answer": "a"}, "needs the field 'question'"),
    "missing answer": ({"id": "x", "question": "q", "options": ["a"]}, "needs the field 'answer'"),
    "options missing": ({"id": "x", "question": "q", "answer": "a"}, "non-empty 'options'"),
    "options empty": ({"id": "x", "question": "q", "options": [], "answer": "a"}, "non-empty 'options'"),
    "answer not an option": ({"id": "x", "question": "q", "options": ["a", "b"], "answer": "c"},
                             "not one of the options"),
    "duplicate options": ({"id": "x", "question": "q", "options": ["a", "a"], "answer": "a"}, "distinct"),
    "missing image": ({**GOOD, "id": "x", "image": "images/nope.png"}, "does not exist"),
    "unreadable image": ({**GOOD, "id": "x", "image": "mixed.jsonl"}, "not a readable image"),
    "duplicate id": ({**GOOD}, "already used on line 1"),
    "mixed kinds": ({"id": "x", "question": "q", "answers": ["a"]}, "open item in a file of choice items"),
    "answers not strings": ({"id": "x", "question": "q", "answers": [1]}, "list of strings"),
    "blank text": ({"id": "x", "text": "  "}, "non-blank"),
    "text with image": ({"id": "x", "text": "hi", "image": "images/0.png"}, "text-only"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_lines_name_file_and_line(folder, mixed, case):
    line, message = BAD_LINES[case]
    first = GOOD if case not in ("blank text", "text with image") else {"id": "g", "text": "fine"}
    path = write_jsonl(folder / f"bad-{case.replace(' ', '-')}.jsonl", [first, line])
    with pytest.raises(BenchmarkError, match=message) as err:
        load_benchmark(path)
    assert f"{path}:2:" in str(err.value)


def test_missing_and_empty_files(folder):
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark(folder / "absent.jsonl")
    with pytest.raises(BenchmarkError, match="holds no items"):
        load_benchmark(write_jsonl(folder / "empty.jsonl", ["", "  "]))


class Untouchable:
    """Any model work on this fails loudly, so the errors below must come from the checks up front."""

    def __getattr__(self, name):
        raise AssertionError(f"model used: {name}")


def test_evaluate_checks_everything_before_model_work(tiny, mixed, texts, folder):
    _, processor = tiny
    model = Untouchable()
    with pytest.raises(BenchmarkError, match="pass reference="):
        evaluate(model, processor, [mixed, texts], progress=False)
    other = fidelity_reference(tiny[0], processor, load_benchmark(write_jsonl(folder / "other.jsonl", TEXTS[:1])),
                               progress=False)
    with pytest.raises(BenchmarkError, match="has no benchmark 'texts'"):
        evaluate(model, processor, [texts], reference=other, progress=False)
    with pytest.raises(BenchmarkError, match=r"not valid JSON"):
        evaluate(model, processor, [mixed, write_jsonl(folder / "broken.jsonl", ["{"])], progress=False)
    with pytest.raises(BenchmarkError, match="unique"):
        evaluate(model, processor, [mixed, mixed], progress=False)
    with pytest.raises(ValueError, match="batch_size and max_new_tokens must be >= 1, got 0"):
        evaluate(model, processor, [mixed], batch_size=0, progress=False)


def test_every_forward_gets_input_ids(talker, mixed, texts, folder):
    """An MoT probe routes by modality from input_ids: no forward (generation steps included) may lack them."""
    model, processor = talker
    seen = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs.get("input_ids", args[0] if args else None) is not None),
        with_kwargs=True)
    try:
        reference = fidelity_reference(model, processor, texts, progress=False)
        evaluate(model, processor, [mixed, write_jsonl(folder / "open.jsonl", OPEN), texts], reference=reference,
                 max_new_tokens=3, progress=False)
    finally:
        handle.remove()
    assert len(seen) > 10 and all(seen)


def test_qwen2_vl_batching_invariance(folder):
    """M-RoPE positions come from the attention mask: right-padded scoring and left-padded generation
    must not change anything."""
    model, _ = build_tiny("qwen2_vl")
    processor = make_processor("qwen2_vl", model)
    bench = load_benchmark(write_jsonl(folder / "qwen.jsonl", MIXED_CHOICE[:4]))
    one = score_choice(model, processor, bench, batch_size=1, progress=False)
    four = score_choice(model, processor, bench, batch_size=4, progress=False)
    for a, b in zip(one.items, four.items):
        assert a.prediction == b.prediction
        assert a.details["logprobs"] == pytest.approx(b.details["logprobs"], abs=TOL)


def test_scorers_refuse_a_zero_batch(tiny, mixed, texts):
    model, processor = tiny
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        score_choice(model, processor, mixed, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        fidelity_reference(model, processor, texts, batch_size=0, progress=False)
