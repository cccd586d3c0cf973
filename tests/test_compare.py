"""Method comparison on shared weights: grid, dense baseline, settings, resume."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny
from tiny_processors import make_processor

from atv.experiments.compare import CompareConfig, run_method_comparison, setting_config
from pruning.config import PruneConfig
from pruning.engine import prune_
from pruning.errors import ConfigError


def test_settings_parse_to_prune_configs():
    assert setting_config("wanda", "60%").sparsity == pytest.approx(0.6)
    assert setting_config("wanda", "0.4").sparsity == pytest.approx(0.4)
    nm = setting_config("atv", "2:4")
    assert nm.nm == (2, 4) and nm.sparsity == 0.5
    with pytest.raises(ConfigError, match="'half'"):
        setting_config("wanda", "half")
    with pytest.raises(ConfigError, match="unknown method"):
        CompareConfig(methods=("obs",))
    with pytest.raises(ConfigError, match="0 < N < M"):
        CompareConfig(settings=("4:2",))
    owl = setting_config("atv+owl", "40%")
    assert (owl.method, owl.allocation, owl.sparsity, owl.allocation_map) == ("atv", "owl", pytest.approx(0.4), None)
    assert setting_config("wanda+map", "50%", allocation_map="runs/map").allocation_map == "runs/map"
    assert setting_config("wanda", "50%", allocation_map="runs/map").allocation == "uniform"
    for bad in ("atv+", "atv+best", "obs+owl"):
        with pytest.raises(ConfigError, match=f"unknown method '{re.escape(bad)}'"):
            CompareConfig(methods=(bad,))
    with pytest.raises(ConfigError, match="allocation 'map' needs allocation_map"):
        CompareConfig(methods=("atv+map",))
    with pytest.raises(ConfigError, match="cannot be combined with pattern 2:4"):
        CompareConfig(methods=("atv", "atv+owl"), settings=("50%", "2:4"))


def test_comparison_grid_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    items = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        items.append({"id": f"q{i}", "image": f"images/{i}.png", "question": "what is shown here",
                      "options": ["cat", "dog"], "answer": "cat"})
    (tmp_path / "look.jsonl").write_text("\n".join(json.dumps(x) for x in items) + "\n")
    (tmp_path / "fid.jsonl").write_text(json.dumps({"id": "t", "text": "the red cat is here"}) + "\n")
    dense, _ = build_tiny("llava", seed=0)
    processor = make_processor("llava", dense)
    calibration = [build_tiny("llava", seed=s, batch=2)[1] for s in (1, 2)]
    made = []

    def make_model():
        made.append(1)
        return build_tiny("llava", seed=0)[0]

    config = CompareConfig(methods=("atv", "magnitude"), settings=("50%", "2:4"), batch_size=2)
    benches = [tmp_path / "look.jsonl", tmp_path / "fid.jsonl"]
    out = run_method_comparison(make_model, processor, calibration, benches, tmp_path / "cmp", config, progress=False)
    assert [r["cell"] for r in out.records] == config.cells() and out.computed == 5 and len(made) == 5
    assert out.records[0]["prune"] is None and out.records[0]["scores"]["fid"] == pytest.approx(100.0)
    nm = next(r for r in out.records if r["cell"] == {"method": "atv", "setting": "2:4"})
    assert nm["prune"]["mean_sparsity"] == pytest.approx(0.5) and nm["prune"]["config"]["pattern"] == "2:4"
    again = run_method_comparison(make_model, processor, calibration, benches, tmp_path / "cmp", config,
                                  progress=False)
    assert again.computed == 0 and len(made) == 5 and again.records == json.loads(json.dumps(out.records))
    assert (tmp_path / "cmp" / "method_scores.md").is_file()


def test_a_given_dense_record_is_reused_not_recomputed(tmp_path):
    (tmp_path / "fid.jsonl").write_text(json.dumps({"id": "t", "text": "the red cat is here"}) + "\n")
    dense, _ = build_tiny("llava", seed=0)
    processor = make_processor("llava", dense)
    calibration = [build_tiny("llava", seed=1)[1]]
    config = CompareConfig(methods=("magnitude",), settings=("50%",))
    made = []

    def make_model():
        made.append(1)
        return build_tiny("llava", seed=0)[0]

    given = {"cell": {"pathway": "dense"}, "scores": {"fid": 100.0}, "retention": {"fid": 100.0},
             "mean_retention": 100.0, "metrics": {}}
    out = run_method_comparison(make_model, processor, calibration, [tmp_path / "fid.jsonl"], tmp_path / "c", config,
                                progress=False, dense_record=given)
    assert len(made) == 1 and out.computed == 1
    assert out.records[0]["cell"] == {"method": "dense", "setting": "dense"}
    assert out.records[0]["scores"] == {"fid": 100.0}
    with pytest.raises(ConfigError, match="not these benchmarks"):
        run_method_comparison(make_model, processor, calibration, [tmp_path / "fid.jsonl"], tmp_path / "d", config,
                              progress=False, dense_record={**given, "scores": {"other": 1.0}})


def test_an_allocated_method_cell_prunes_as_prune_config_with_that_allocation(tmp_path):
    (tmp_path / "fid.jsonl").write_text(json.dumps({"id": "t", "text": "the red cat is here"}) + "\n")
    processor = make_processor("llava", build_tiny("llava", seed=0)[0])
    calibration = [build_tiny("llava", seed=s, batch=2)[1] for s in (1, 2)]
    made = []

    def make_model():
        made.append(build_tiny("llava", seed=0)[0])
        return made[-1]

    config = CompareConfig(methods=("wanda", "wanda+owl"), settings=("50%",))
    out = run_method_comparison(make_model, processor, calibration, [tmp_path / "fid.jsonl"], tmp_path / "c", config,
                                progress=False)
    owl = out.records[2]
    assert owl["cell"] == {"method": "wanda+owl", "setting": "50%"} and owl["prune"]["config"]["allocation"] == "owl"
    direct = build_tiny("llava", seed=0)[0]
    prune_(direct, PruneConfig("wanda", sparsity=0.5, allocation="owl"), calibration, progress=False)
    expected, got, uniform = direct.state_dict(), made[2].state_dict(), made[1].state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not all(torch.equal(uniform[k], got[k]) for k in expected)  # owl moved sparsity between the layers
