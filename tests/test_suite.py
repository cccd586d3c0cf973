"""The offline benchmark suite: determinism, disjoint splits, harness format, chance levels, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from atv.suite import (
    BENCHMARKS,
    DIGIT_SLICES,
    IMAGE_BENCHMARKS,
    SPLITS,
    Item,
    chance_level,
    digit_indices,
    item_seed,
    make_items,
    write_prompt_suite,
    write_suite,
)
from evaluation.benchmarks import CHOICE, FIDELITY
from pruning.data import read_records, to_messages
from pruning.errors import ConfigError, OutputExistsError


def _image_hash(item: Item) -> str:
    return hashlib.sha1(item.image.tobytes()).hexdigest()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return write_suite(tmp_path_factory.mktemp("s") / "suite", seed=3, n_eval=5, n_calib=10)


def test_same_seed_gives_identical_files(suite, tmp_path):
    again = write_suite(tmp_path / "again", seed=3, n_eval=5, n_calib=10)
    assert _tree(suite) == _tree(again)


def test_other_seed_gives_other_items(suite, tmp_path):
    other = write_suite(tmp_path / "other", seed=4, n_eval=5, n_calib=10)
    assert (suite / "digit.jsonl").read_text() != (other / "digit.jsonl").read_text()


def test_digit_splits_are_disjoint_and_cover_all_digits():
    parts = [set(digit_indices(split, seed=0)) for split in SPLITS]
    assert sum(len(p) for p in parts) == 1797 == len(set().union(*parts))
    assert [len(p) for p in parts] == [stop - start for start, stop in DIGIT_SLICES.values()]


@pytest.mark.parametrize("name", ["digit", "digit-compare"])
def test_digit_images_never_shared_across_splits(name):
    hashes = {split: {_image_hash(i) for i in make_items(name, split, 60, seed=0)} for split in SPLITS}
    assert not hashes["train"] & hashes["eval"]
    assert not hashes["calib"] & hashes["eval"]
    assert not hashes["train"] & hashes["calib"]


def test_scene_streams_are_disjoint_across_splits():
    # Scenes are drawn from per-(split, item) random streams; two streams can render the same simple
    # picture by chance, so disjointness is a property of the streams (and of the stream keys' hashes).
    import zlib

    keys = {split: {zlib.crc32(item_seed(0, split, name, i).encode()) for name in IMAGE_BENCHMARKS
                    for i in range(2000)} for split in SPLITS}
    assert not keys["train"] & keys["eval"] and not keys["calib"] & keys["eval"] and not keys["train"] & keys["calib"]


def test_harness_format(suite):
    summary = json.loads((suite / "suite.json").read_text())
    assert set(summary["benchmarks"]) == set(BENCHMARKS)
    for name, bench in BENCHMARKS.items():
        records = [json.loads(line) for line in (suite / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == 5 and len({r["id"] for r in records}) == 5
        for r in records:
            if bench.kind == FIDELITY:
                assert set(r) == {"id", "text"} and len(r["text"].split()) > 5
                continue
            assert (r["image"] is None) == (not bench.image)
            if r["image"]:
                assert (suite / r["image"]).is_file()
            if bench.kind == CHOICE:
                assert r["answer"] in r["options"] and len(set(r["options"])) == len(r["options"])
            else:
                assert r["answers"] and all(isinstance(a, str) for a in r["answers"])


def test_digit_answer_is_the_dataset_label():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    items = make_items("digit", "eval", 10, seed=0)
    assert [int(i.answer) for i in items] == [int(labels[j]) for j in digit_indices("eval", 0)[:10]]


def test_calibration_file_reads_as_llava_conversations(suite):
    records = read_records(suite / "calib.json")
    assert len(records) == 10
    assert {r["id"].split("-calib-")[0] for r in records} == set(IMAGE_BENCHMARKS)  # round-robin
    for record in records:
        assert (suite / record["image"]).is_file()
        messages = to_messages(record)
        assert messages[0]["content"][0] == {"type": "image"} and messages[1]["role"] == "assistant"
    eval_images = {p.read_bytes() for p in (suite / "images").glob("*") if "-calib-" not in p.name}
    assert not eval_images & {(suite / r["image"]).read_bytes() for r in records}


def test_chance_level():
    items = [Item(id="a", question="q", options=["x", "y"], answer="x"),
             Item(id="b", question="q", options=["1", "2", "3", "4"], answer="1"),
             Item(id="c", question="q", answers=["z"])]
    assert chance_level(items) == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert chance_level(make_items("digit", "eval", 7)) == pytest.approx(0.1)
    item = {"id": "d", "question": "q", "options": ["a", "b", "c"], "answer": "a"}
    assert chance_level([item]) == pytest.approx(1 / 3)


def test_bad_input_raises(suite, tmp_path):
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        make_items("nope", "eval", 3)
    with pytest.raises(ConfigError, match="n_eval must be >= 1, got 0"):
        write_suite(tmp_path / "x", n_eval=0)
    with pytest.raises(ConfigError, match="split must be one of"):
        make_items("digit", "test", 3)
    with pytest.raises(ConfigError, match="only an 'eval' split"):
        make_items("text-mc", "train", 3)
    with pytest.raises(ConfigError, match="has 397 digit images"):
        make_items("digit", "eval", 398)
    with pytest.raises(ConfigError, match="empty list"):
        chance_level([])
    with pytest.raises(ConfigError, match="text-fidelity item"):
        chance_level(make_items("text-fidelity", "eval", 2))
    with pytest.raises(OutputExistsError, match="not empty"):
        write_suite(suite, n_eval=1)
    assert not list(tmp_path.glob(".*partial*"))  # failed writes leave nothing behind


def test_prompt_suite_holds_train_items_of_every_image_benchmark(suite, tmp_path):
    from evaluation import load_benchmark

    prompts = write_prompt_suite(tmp_path / "prompts", seed=3, per_benchmark=4)
    summary = json.loads((prompts / "suite.json").read_text())
    assert list(summary["benchmarks"]) == list(IMAGE_BENCHMARKS) and summary["split"] == "train"
    for name in IMAGE_BENCHMARKS:
        bench = load_benchmark(prompts / f"{name}.jsonl")
        want = make_items(name, "train", 4, seed=3)
        assert [i.id for i in bench.items] == [i.id for i in want] and all(i.image is not None for i in bench.items)
        eval_images = {p.read_bytes() for p in (suite / "images").glob(f"{name}-0*.png")}
        assert not eval_images & {p.read_bytes() for p in (prompts / "images").glob(f"{name}-train-*.png")}
    with pytest.raises(ConfigError, match="per_benchmark must be >= 1, got 0"):
        write_prompt_suite(tmp_path / "none", per_benchmark=0)
    assert not (tmp_path / "none").exists()
