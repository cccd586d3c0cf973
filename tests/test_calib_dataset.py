"""Calibration through the datasets library: a local parquet dataset holding the images themselves gives the
same samples (and so the same pruned weights) as the same records in a LLaVA JSON; filters and the skip
accounting apply; bad sources and filters are refused by name."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from atv.cli import main
from pruning.data import load_calibration_dataset
from pruning.errors import CalibrationError
from pruning.io import load_model

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib-dataset")
    model, _ = build_tiny("llava")
    folder = save_model_dir("llava", model, tmp / "model")
    calib, images = write_calibration(tmp / "calib", n=5)
    records = json.loads(calib.read_text())
    table = {"id": [str(r["id"]) for r in records], "conversations": [r["conversations"] for r in records],
             "image": [str(images / r["image"]) for r in records],
             "source": ["coco" if i % 2 == 0 else "ocr" for i in range(len(records))]}
    dataset = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    parquet = tmp / "calib.parquet"
    dataset.to_parquet(str(parquet))
    return tmp, folder, calib, images, parquet


def _weights(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_parquet_dataset_prunes_like_the_same_records_in_json(data, tmp_path):
    tmp, folder, calib, images, parquet = data
    common = ["prune", "--model", str(folder), "--method", "atv", "--sparsity", "0.5", "--nsamples", "3"]
    assert main([*common, "--calib", str(calib), "--images", str(images), "--out", str(tmp_path / "json")]) == 0
    assert main([*common, "--calib-dataset", str(parquet), "--out", str(tmp_path / "parquet")]) == 0
    a, b = _weights(tmp_path / "json"), _weights(tmp_path / "parquet")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "parquet" / "prune_report.json").read_text())
    expected = json.loads((tmp_path / "json" / "prune_report.json").read_text())["calibration"]["ids"]
    assert report["calibration"]["ids"] == expected and report["calibration"]["source"].endswith("(train)")


def test_filters_and_refusals(data):
    tmp, folder, calib, images, parquet = data
    _, processor = load_model(folder, with_processor=True)
    _, report = load_calibration_dataset(parquet, processor, nsamples=2, seed=0, filters={"source": "ocr"})
    ocr = {str(r["id"]) for i, r in enumerate(json.loads(calib.read_text())) if i % 2 == 1}
    assert report.used == 2 and set(report.ids) <= ocr
    with pytest.raises(CalibrationError, match="only 2 usable calibration records"):
        load_calibration_dataset(parquet, processor, nsamples=3, seed=0, filters={"source": "ocr"})
    text = tmp / "records.txt"
    text.write_text("x")
    with pytest.raises(CalibrationError, match="a calibration dataset file is .parquet"):
        load_calibration_dataset(text, processor)


def test_cli_refuses_bad_calibration_choices_before_loading(data, tmp_path, capsys):
    tmp, folder, calib, images, parquet = data
    base = ["prune", "--model", str(folder), "--method", "wanda", "--out", str(tmp_path / "o")]
    assert main([*base, "--calib", str(calib), "--images", str(images), "--calib-dataset", str(parquet)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--calib-dataset", str(parquet), "--calib-filter", "source"]) == 2
    assert "key=value, got 'source'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hub_dataset_is_streamed_lazily_in_a_seeded_order(data, monkeypatch):
    """A Hub name is opened with streaming=True (here served by the local parquet streamed through the same
    datasets machinery, since no hub is reachable): records are read only until enough are usable, the
    order is the seeded shuffle buffer's, and the skip accounting applies."""
    tmp, folder, calib, images, parquet = data
    _, processor = load_model(folder, with_processor=True)
    opened, real_load = [], datasets.load_dataset
    expected = [r["id"] for r in real_load("parquet", data_files=str(parquet), split="train",
                                           streaming=True).shuffle(seed=0, buffer_size=10_000)]
    no_image = expected[0]  # the first record of seed 0's order has no image: skipped and counted

    def hub(name, split=None, streaming=False, **kwargs):
        opened.append((name, split, streaming))
        stream = real_load("parquet", data_files=str(parquet), split="train", streaming=True)
        return stream.map(lambda r: {**r, "image": None if r["id"] == no_image else r["image"]})

    monkeypatch.setattr(datasets, "load_dataset", hub)
    seen = []
    original_shuffle = datasets.IterableDataset.shuffle

    def counting_shuffle(self, *args, **kwargs):
        return original_shuffle(self, *args, **kwargs).map(lambda r: seen.append(r["id"]) or r)

    monkeypatch.setattr(datasets.IterableDataset, "shuffle", counting_shuffle)
    _, first = load_calibration_dataset("org/llava-like", processor, nsamples=2, seed=0, split="train")
    assert opened == [("org/llava-like", "train", True)]
    assert first.used == 2 and len(seen) == 2 + first.skipped["no_image"] < 5  # read no further than needed
    assert [i for i in seen if i != no_image] == first.ids and first.skipped["no_image"] == seen.count(no_image) == 1
    assert seen == expected[:len(seen)]  # the seeded shuffle buffer's order
    seen.clear()
    _, again = load_calibration_dataset("org/llava-like", processor, nsamples=2, seed=0, split="train")
    assert again.ids == first.ids
    orders = {tuple(seen)}
    for seed in range(1, 4):
        seen.clear()
        load_calibration_dataset("org/llava-like", processor, nsamples=2, seed=seed, split="train")
        orders.add(tuple(seen))
    assert len(orders) > 1  # the seed changes the order
