"""Hostile inputs end in one clear line, each refused where it enters (reliability round 3).

Each case is a command line run in this process through ``atv.cli.main`` in a user's folder (a tiny model,
calibration data, a benchmark and broken variants of them), or a callable given that folder (a library entry
point). A command must exit 2 with one ``error:`` line matching the case's pattern and no traceback; a callable
must raise a one-line ToolkitError matching it. Either way no file of the folder changes or appears.
"""

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
from cli_batch import tree
from tiny_models import build_tiny
from tiny_processors import write_jsonl, write_user_folder

from atv.cli import main
from pruning.errors import ToolkitError

PRUNE = ["prune", "--model", "model", "--method", "magnitude"]
WANDA = ["prune", "--model", "model", "--method", "wanda", "--calib", "calib/calib.json", "--images", "calib/images"]
PROBE = ["probe", "--model", "model", "--calib", "calib/calib.json", "--images", "calib/images", "--bench",
         "look.jsonl", "--nsamples", "2", "--pathways", "text", "--pools", "text", "--sparsities", "0.5"]
BIG = str(2**32)


def _record(turns: list | None = None, image: str = "0.png") -> dict:
    return {"id": "s0", "image": image, "conversations": turns or [
        {"from": "human", "value": "<image>\ndescribe the image"}, {"from": "gpt", "value": "a red cat"}]}


def _calibration_files(base: Path) -> None:
    """Hostile calibration files (and decompression bombs: 1-bit PNGs of a few kB, above PIL's pixel limit
    once, which PIL warns about, and twice, which it refuses)."""
    from PIL import Image

    Image.new("1", (14000, 14000)).save(base / "calib" / "images" / "bomb.png")
    Image.new("1", (10000, 10000)).save(base / "calib" / "images" / "bomb_warned.png")
    (base / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    files = {
        "surrogate.json": [_record([{"from": "human", "value": "<image>\nx \ud800"}, {"from": "gpt", "value": "a"}])],
        "from_list.json": [_record([{"from": ["human"], "value": "<image>\nwhat"}, {"from": "gpt", "value": "a"}])],
        "from_dict.json": [_record([{"from": {"who": 1}, "value": "<image>\nwhat"}, {"from": "gpt", "value": "a"}])],
        "two_tags.json": [_record([{"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "a"},
                                   {"from": "human", "value": "<image>\nand"}, {"from": "gpt", "value": "b"}])],
        "bomb.json": [_record(image="bomb.png")],
        "bomb_warned.json": [_record(image="bomb_warned.png")],
    }
    for name, records in files.items():
        (base / name).write_text(json.dumps(records))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The user's folder every case runs in."""
    base = tmp_path_factory.mktemp("hostile_inputs") / "base"
    write_user_folder(base)
    (base / "seed.yaml").write_text(f"model: model\nmethod: magnitude\nseed: {BIG}\n")
    (base / "null_model.yaml").write_text("model: null\nmethod: magnitude\n")
    (base / "null_nsamples.yaml").write_text("model: model\nmethod: magnitude\nnsamples: null\n")
    (base / "null_method.yaml").write_text("model: model\nmethod: null\n")
    _calibration_files(base)
    _compare_logs(base)
    _figure_inputs(base)
    _studies(base)
    shutil.copytree(base / "model", base / "no_layers")
    config = json.loads((base / "no_layers" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 0
    (base / "no_layers" / "config.json").write_text(json.dumps(config))
    for name, kl in {"negative": -0.5, "nan": float("nan"), "inf": float("inf")}.items():
        cells = [{"layer": i, "path": "text", "group": g, "kl": kl if (i, g) == (1, "ffn") else 0.1}
                 for i in range(2) for g in ("attn", "ffn")]
        (base / f"map_{name}.json").write_text(json.dumps({"format": "atv-sensitivity-map", "version": 1,
                                                           "num_layers": 2, "sparsity": 0.5, "cells": cells}))
    return base


def _figure_inputs(base: Path) -> None:
    """Results folders (figs/NAME) that each hold one malformed log or foreign ``.pt`` file, and nothing else."""
    import torch

    dense = {"cell": {"pathway": "dense"}, "mean_retention": 100.0, "scores": {"look": 80.0}}
    probe = {"cell": {"pathway": "text", "pool": "text", "sparsity": 0.5}, "mean_retention": 90.0}
    logs = {
        "probe_no_mean": ("probe", [dense, dict(probe)]),
        "probe_lacks_key": ("probe", [dense, {"cell": {"pathway": "text", "pool": "text"}, "mean_retention": 9.0}]),
        "probe_mean_string": ("probe", [dense, {**probe, "mean_retention": "high"}]),
        "probe_sparsity_string": ("probe", [dense, {**probe, "cell": {**probe["cell"], "sparsity": "half"}}]),
        "probe_cell_string": ("probe", [dense, {"cell": "text", "mean_retention": 9.0}]),
        "methods_scores_string": ("methods", [{"cell": {"method": "atv", "setting": "50%"}, "scores": "x"}]),
        "map_kl_null": ("map", [{"cell": {"layer": 0, "pathway": "text", "group": "attn", "sparsity": 0.5},
                                 "kl": None, "top1": 90.0}]),
    }
    del logs["probe_no_mean"][1][1]["mean_retention"]
    for name, (kind, records) in logs.items():
        (base / "figs" / name / kind).mkdir(parents=True)
        write_jsonl(base / "figs" / name / kind / "results.jsonl", records)
    saved = {"hidden_states_tensor": ("hidden_states.pt", torch.zeros(3)),
             "pool_masks_dict": ("pool_masks.pt", {"masks": 1}),
             "pool_masks_foreign": ("pool_masks.pt", {"method": "wanda", "sparsity": 0.5, "pools": ["text"],
                                                      "packed": {"text": {"w": "bits"}}, "shapes": {"w": [2, 2]}}),
             "drift_garbage": ("drift.pt", None)}
    for name, (file, content) in saved.items():
        (base / "figs" / name / "analysis").mkdir(parents=True)
        if content is None:
            (base / "figs" / name / "analysis" / file).write_bytes(b"\x00not a torch file" * 8)
        else:
            torch.save(content, base / "figs" / name / "analysis" / file)


def _studies(base: Path) -> None:
    """A finished probe study (study/), a copy whose results.jsonl holds one cell twice (study_twice/) and one
    with a record of a cell outside the grid (study_forged/)."""
    with contextlib.chdir(base):
        assert main(PROBE + ["--out", "study"]) == 0
    lines = (base / "study" / "results.jsonl").read_text().splitlines(keepends=True)
    forged = json.loads(lines[-1])
    forged["cell"]["sparsity"] = 0.9
    for name, text in {"twice": "".join(lines + lines[-1:]), "forged": "".join(lines) + json.dumps(forged) + "\n"
                       }.items():
        shutil.copytree(base / "study", base / f"study_{name}")
        (base / f"study_{name}" / "results.jsonl").write_text(text)


def _cell(cell: dict, look: list, fid: list, ids: str = "ab") -> dict:
    items = {"look": {"ids": ids, "scores": look}, "fid": {"ids": "cd", "scores": fid}}
    scores = {name: 100 * sum(v["scores"]) / len(v["scores"]) for name, v in items.items()}
    return {"cell": cell, "scores": scores, "retention": dict(scores), "mean_retention": 50.0, "items": items}


def _compare_logs(base: Path) -> None:
    """A probe log of three cells (compare/good) and broken variants of its text/text/0.5 cell."""
    def log(name: str, **text) -> None:
        cells = [_cell({"pathway": "dense"}, [1, 1, 1, 1], [1.0, 1.0]),
                 _cell({"pathway": "text", "pool": "text", "sparsity": 0.5}, [1, 0, 1, 0], [0.5, 0.25]),
                 _cell({"pathway": "visual", "pool": "text", "sparsity": 0.5}, [1, 1, 1, 0], [0.5, 0.75])]
        for key, value in text.items():
            key, _, name_ = key.partition("__")
            if name_:
                cells[1][key][name_] = value
            else:
                cells[1][key] = value
        (base / "compare" / name).mkdir(parents=True)
        write_jsonl(base / "compare" / name / "results.jsonl", cells)

    log("good")
    log("score_string", scores__look="50")
    log("score_null", scores__look=None)
    log("score_nan", scores__look=float("nan"))
    log("mean_string", mean_retention="high")
    log("item_nan", items__look={"ids": "ab", "scores": [1, float("nan"), 1, 0]})
    log("item_string", items__look={"ids": "ab", "scores": [1, "x", 1, 0]})
    log("items_not_a_list", items__look={"ids": "ab", "scores": "abcd"})
    log("other_items", items__look={"ids": "zz", "scores": [1, 0, 1, 0]})


def _prune_config(**kwargs):
    from pruning.config import PruneConfig

    return lambda base: PruneConfig("magnitude", **kwargs)


def _map_config(**kwargs):
    from atv.experiments.sensitivity_map import MapConfig

    return lambda base: MapConfig(**kwargs)


def _train_config(**kwargs):
    from atv.default_model import TrainConfig

    return lambda base: TrainConfig(**kwargs)


def _calib(name: str) -> list[str]:
    return ["prune", "--model", "model", "--method", "wanda", "--calib", name, "--images", "calib/images",
            "--nsamples", "1", "--out", "new"]


def _hub_offline(base: Path) -> None:
    """A Hub dataset id with the Hub unreachable (offline mode: no network is tried)."""
    from unittest import mock

    import datasets
    import huggingface_hub.constants

    from pruning.data import load_calibration_dataset

    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
            mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
        load_calibration_dataset("org/llava-like", None, nsamples=1)


def _dataset(name: str) -> list[str]:
    return ["prune", "--model", "model", "--method", "wanda", "--calib-dataset", name, "--nsamples", "1",
            "--out", "new"]


def _compare(log: str) -> list[str]:
    return ["compare", "--results", f"compare/{log}", "--a", "visual/text/0.5", "--b", "text/text/0.5",
            "--resamples", "50"]


def _prune_no_layers(base: Path) -> None:
    """prune_ on an in-memory model whose decoder has no layers."""
    from pruning.adapters import get_adapter
    from pruning.config import PruneConfig
    from pruning.engine import prune_

    model, _ = build_tiny("llava")
    del get_adapter(model).decoder_layers(model)[:]
    prune_(model, PruneConfig("magnitude"), [], progress=False)


NO_LAYERS = r"model 'no_layers' has 0 decoder layers \(num_hidden_layers = 0 in its config\)"


def _map(name: str) -> list[str]:
    return PRUNE + ["--allocation", "map", "--allocation-map", f"map_{name}.json", "--out", "new"]


KL = r"sensitivity map 'map_{}.json': cell \(layer 1, path 'text', group 'ffn'\) has KL {}, not a finite number >= 0"


def _figures(name: str) -> list[str]:
    return ["figures", "--results", f"figs/{name}", "--out", "new", "--formats", "png"]


RECORD = r"\(sensitivity: figs/{}/probe/results.jsonl: record 2 \(cell .*\)"
DAMAGED = r"cell 'text/text/0\.5': {} is {}, not a finite number.*re-run that cell"
MISSING = r"--calib-dataset '{}' looks like a local path but does not exist"
SEED = r"seed must be in \[0, 2\*\*32\), got "
# name -> (argv, or a callable given the folder; regex the error line must match)
CASES = {
    # 1. seeds numpy cannot take, refused where they enter (options, recipes, library configs)
    "prune-seed-2**32": (PRUNE + ["--seed", BIG, "--out", "new"], SEED + BIG),
    "prune-seed-negative": (PRUNE + ["--seed", "-1", "--out", "new"], SEED + "-1"),
    "recipe-seed-2**32": (["prune", "--recipe", "seed.yaml", "--out", "new"], SEED + BIG),
    "probe-seed-2**32": (PROBE + ["--seed", BIG, "--out", "new"], SEED + BIG),
    "eval-seed-2**32": (["eval", "--tasks", "look.jsonl", "--model", "model", "--seed", BIG], SEED + BIG),
    "demo-seed-negative": (["demo", "--quick", "--seed", "-1", "--out", "new"], SEED + "-1"),
    "suite-seed-2**32": (["suite", "--out", "new", "--seed", BIG], SEED + BIG),
    "figures-seed-negative": (["figures", "--results", "calib", "--out", "new", "--seed", "-1"], SEED + "-1"),
    "compare-seed-2**32": (["compare", "--results", "look.jsonl", "--a", "x", "--b", "y", "--seed", BIG],
                           SEED + BIG),
    "config-seed-2**32": (_prune_config(seed=2**32), SEED + BIG),
    "map-config-seed-negative": (_map_config(seed=-5), SEED + "-5"),
    "train-config-seed-2**32": (_train_config(seed=2**32), SEED + BIG),
    # 2. device strings torch cannot parse, and the meta device (no data: nothing to load or prune)
    "device-not-parsable": (PRUNE + ["--device", "cuda:abc", "--out", "new"], r"device 'cuda:abc' is not a torch"),
    "device-meta": (PRUNE + ["--device", "meta", "--out", "new"], r"device 'meta' holds no data"),
    "eval-device-meta": (["eval", "--tasks", "look.jsonl", "--model", "model", "--device", "meta"],
                         r"device 'meta' holds no data"),
    "offload-device-meta": (PRUNE + ["--offload-device", "meta", "--out", "new"],
                            r"offload_device must be a device that holds data .*got 'meta'"),
    # 3. null for a key a recipe must give a value for
    "recipe-null-required": (["prune", "--recipe", "null_model.yaml", "--out", "new"],
                             r"key 'model' is null, but --model is required"),
    "recipe-null-number": (["prune", "--recipe", "null_nsamples.yaml", "--out", "new"],
                           r"key 'nsamples' is null: give a value, or drop the key for the default \(128\)"),
    "recipe-null-choice": (["prune", "--recipe", "null_method.yaml", "--out", "new"],
                           r"key 'method' is null: give a value, or drop the key for the default \(atv\)"),
    # 5. calibration files that used to end in a traceback (a bomb is an unreadable image: skipped and counted)
    "calib-nested-deeply": (_calib("deep.json"), r"'deep.json' holds JSON nested too deeply"),
    "calib-lone-surrogate": (_calib("surrogate.json"), r"record 's0': a turn's text holds '\\ud800', half of a"),
    "calib-from-list": (_calib("from_list.json"), r"record 's0': unknown speaker \['human'\]"),
    "calib-from-dict": (_calib("from_dict.json"), r"record 's0': unknown speaker \{'who': 1\}"),
    "calib-more-tags-than-images": (_calib("two_tags.json"), r"record 's0' has 2 turns with an <image> tag but one"),
    "calib-decompression-bomb": (_calib("bomb.json"), r"0 usable .*'unreadable_image': 1"),
    "calib-decompression-bomb-warned": (_calib("bomb_warned.json"), r"0 usable .*'unreadable_image': 1"),
    # round 3, second pass
    # 1. a --calib-dataset that looks like a local path but is missing is not taken for a Hub id; the Hub offline
    "dataset-missing-file": (_dataset("data/calib.parquet"), MISSING.format("data/calib.parquet")),
    "dataset-missing-relative": (_dataset("./nope"), MISSING.format(r"\./nope")),
    "dataset-missing-nested": (_dataset("a/b/c"), MISSING.format("a/b/c")),
    "dataset-missing-jsonl": (_dataset("calib.jsonl"), MISSING.format(r"calib\.jsonl")),
    "dataset-hub-offline": (_hub_offline, r"the Hub is unreachable, so calibration dataset 'org/llava-like' cannot"),
    # 2. atv compare: scores that are not finite numbers (a string, null, NaN) in a compared cell
    "compare-score-string": (_compare("score_string"), DAMAGED.format(r"scores\['look'\]", "'50'")),
    "compare-score-null": (_compare("score_null"), DAMAGED.format(r"scores\['look'\]", "None")),
    "compare-score-nan": (_compare("score_nan"), DAMAGED.format(r"scores\['look'\]", "nan")),
    "compare-mean-string": (_compare("mean_string"), DAMAGED.format("mean_retention", "'high'")),
    "compare-item-nan": (_compare("item_nan"), r"item score 1 of 'look' is nan, not a finite number in \[0, 1\]"),
    "compare-item-string": (_compare("item_string"), DAMAGED.format("item score 1 of 'look'", "'x'")),
    # 3. atv figures: result records that miss keys or hold wrong types, .pt files that are not what they should be
    "figures-probe-lacks-mean": (_figures("probe_no_mean"), RECORD.format("probe_no_mean") + " lacks 'mean_retention'"),
    "figures-probe-lacks-cell-key": (_figures("probe_lacks_key"),
                                     RECORD.format("probe_lacks_key") + " lacks cell 'sparsity'"),
    "figures-probe-mean-string": (_figures("probe_mean_string"),
                                  RECORD.format("probe_mean_string") + ": mean_retention is 'high', not a finite"),
    "figures-probe-sparsity-string": (_figures("probe_sparsity_string"),
                                      RECORD.format("probe_sparsity_string") + ": cell 'sparsity' is 'half', not a"),
    "figures-probe-cell-string": (_figures("probe_cell_string"),
                                    r"probe/results.jsonl: record 2 has no 'cell' object"),
    "figures-methods-scores-string": (_figures("methods_scores_string"),
                                      r"figs/methods_scores_string/methods/results.jsonl: record 1 .*'scores' is 'x'"),
    "figures-map-kl-null": (_figures("map_kl_null"), r"map/results.jsonl: record 1 .*: kl is None, not a finite"),
    "figures-pt-tensor": (_figures("hidden_states_tensor"),
                          r"tsne: figs/hidden_states_tensor/analysis/hidden_states.pt holds a Tensor, not the dict"),
    "figures-pt-lacks-keys": (_figures("pool_masks_dict"), r"pool_masks.pt lacks \['method', 'sparsity', 'pools'"),
    "figures-pt-foreign-masks": (_figures("pool_masks_foreign"),
                                 r"pool_masks.pt: 'packed' and 'shapes' are not the bit-packed masks"),
    "figures-pt-garbage": (_figures("drift_garbage"),
                           r"drift: figs/drift_garbage/analysis/drift.pt is not a file torch.load reads with "
                           r"weights_only=True \(UnpicklingError\)"),
    # 4. a sensitivity map whose KL is negative or not finite, refused naming the cell
    "map-kl-negative": (_map("negative"), KL.format("negative", "-0.5")),
    "map-kl-nan": (_map("nan"), KL.format("nan", "nan")),
    "map-kl-inf": (_map("inf"), KL.format("inf", "inf")),
    # 5. a model whose config has no decoder layers, refused before any weight is read
    "prune-no-layers": (["prune", "--model", "no_layers", "--method", "magnitude", "--out", "new"], NO_LAYERS),
    "probe-no-layers": (["probe", "--model", "no_layers", *PROBE[3:], "--out", "new"], NO_LAYERS),
    "eval-no-layers": (["eval", "--tasks", "look.jsonl", "--model", "no_layers"], NO_LAYERS),
    "library-no-layers": (_prune_no_layers, r"the llava model has no decoder layers: there is nothing to prune"),
    # 6. an empty --targets names no Linear (it used to be looked up as the decoder block itself)
    "targets-empty-string": (PRUNE + ["--targets", "", "--out", "new"],
                             r"targets is empty \(got \[''\]\): name at least one Linear"),
    "targets-blank-among-names": (PRUNE + ["--targets", "mlp.down_proj", " ", "--out", "new"],
                                  r"targets holds ' ', not a Linear name, in \['mlp.down_proj', ' '\]"),
    "config-targets-empty-string": (_prune_config(targets=("",)), r"targets is empty \(got \[''\]\)"),
    # 7. a probe study's results.jsonl with a cell twice, or a cell that is not in its grid
    "probe-log-cell-twice": (PROBE + ["--out", "study_twice"], r"study_twice/results.jsonl: record 3 is a second "
                             r"record of cell \{'pathway': 'text', 'pool': 'text', 'sparsity': 0.5\}; delete one"),
    "probe-log-cell-forged": (PROBE + ["--out", "study_forged"], r"study_forged/results.jsonl: record 3 is of cell "
                              r"\{'pathway': 'text', 'pool': 'text', 'sparsity': 0.9\}, which is not in this study's"),
    "compare-items-not-a-list": (_compare("items_not_a_list"), r"items\['look'\] is not \{'ids': str, 'scores'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_and_writes_nothing(world, monkeypatch, capsys, name):
    what, pattern = CASES[name]
    monkeypatch.chdir(world)
    before = tree(world)
    if callable(what):
        with pytest.raises(ToolkitError) as info:
            what(world)
        line = str(info.value)
        assert "\n" not in line
    else:
        code = main(what)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert len(errors) == 1, err[-3000:]
        line = errors[0]
    assert re.search(pattern, line), line
    assert tree(world) == before


def test_compare_says_which_benchmark_it_leaves_out_and_why(world, monkeypatch, capsys, caplog):
    """Cells that scored different items of a benchmark are compared on the others, and the one left out (and
    the mean retention it breaks) is named with the reason, in the result and as a warning."""
    from atv.experiments.compare import compare_cells
    from atv.experiments.records import read_records

    records = read_records(world / "compare" / "other_items" / "results.jsonl")
    difference = compare_cells(records, "visual/text/0.5", "text/text/0.5")
    assert list(difference["rows"]) == ["fid"]
    assert difference["left_out"] == {"look": "the two cells scored different items", "mean retention":
                                      "the dense record and both cells do not hold the same items of every "
                                      "benchmark their retention averages"}
    assert "look left out: the two cells scored different items" in caplog.text
    good = compare_cells(read_records(world / "compare" / "good" / "results.jsonl"), "visual/text/0.5", "dense")
    assert list(good["rows"]) == ["look", "fid", "mean retention"] and good["left_out"] == {}
