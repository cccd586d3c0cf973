"""Recipes: every option of `atv prune` / `atv probe` as a YAML key; flags on the command line win;
bad keys and types are refused by name; the recipe a run used is saved and reproduces its masks."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from atv.cli import build_parser, main, read_recipe
from pruning.errors import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    model, _ = build_tiny("llava")
    folder = save_model_dir("llava", model, tmp / "model")
    calib, images = write_calibration(tmp / "calib", n=3)
    return tmp, folder, calib, images


def _weights(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_saved_recipe_reproduces_the_pruned_model(setup, tmp_path):
    tmp, folder, calib, images = setup
    first = tmp_path / "first"
    assert main(["prune", "--model", str(folder), "--method", "atv", "--sparsity", "0.6", "--alpha", "0.5",
                 "--calib", str(calib), "--images", str(images), "--nsamples", "3", "--out", str(first)]) == 0
    saved = yaml.safe_load((first / "recipe.yaml").read_text())
    assert saved["method"] == "atv" and saved["sparsity"] == 0.6 and saved["alpha"] == 0.5
    assert "out" not in saved and "overwrite" not in saved
    second = tmp_path / "second"
    assert main(["prune", "--recipe", str(first / "recipe.yaml"), "--out", str(second)]) == 0
    a, b = _weights(first), _weights(second)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    third = tmp_path / "third"  # a flag on the command line wins over the file
    assert main(["prune", "--recipe", str(first / "recipe.yaml"), "--sparsity", "0.5", "--out", str(third)]) == 0
    assert yaml.safe_load((third / "recipe.yaml").read_text())["sparsity"] == 0.5


def test_probe_saves_its_recipe(setup, tmp_path):
    tmp, folder, calib, images = setup
    bench = Path(__file__).resolve().parent / "lmms_tasks" / "atv_tiny_choice.jsonl"
    recipe = tmp_path / "study.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(folder), "calib": str(calib), "images": str(images),
                                      "bench": [str(bench)], "nsamples": 3, "sparsities": [0.5],
                                      "pathways": ["text"], "pools": ["text"], "batch-size": 2}))
    assert main(["probe", "--recipe", str(recipe), "--out", str(tmp_path / "study")]) == 0
    saved = yaml.safe_load((tmp_path / "study" / "recipe.yaml").read_text())
    assert saved["pathways"] == ["text"] and saved["sparsities"] == [0.5] and saved["batch_size"] == 2


@pytest.mark.parametrize("content, message", [
    ({"methd": "atv"}, "unknown key 'methd'"),
    ({"sparsity": "half"}, "key 'sparsity' must be a float"),
    ({"pattern": "2:4"}, None),
    ({"nsamples": 1.5}, "key 'nsamples' must be a int"),
    ({"offload": "yes"}, "key 'offload' must be true or false"),
    ({"targets": [{"a": 1}]}, "key 'targets' must be a list of str"),
    ({"sparsity": [0.5, 0.6]}, "key 'sparsity' takes one value"),
    ({"alpha": True}, "key 'alpha' must be a float"),
    (["method", "atv"], "must be a mapping"),
])
def test_bad_recipes_are_refused_by_key(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(content))
    parser = build_parser().commands["prune"]
    if message is None:
        assert read_recipe(parser, path) == {"pattern": "2:4"}
        return
    with pytest.raises(ConfigError, match=message):
        read_recipe(parser, path)


def test_unquoted_pattern_is_caught_and_the_cli_names_the_file(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("pattern: 2:4\n")  # YAML 1.1 reads this as the integer 124
    assert main(["prune", "--recipe", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "key 'pattern' must be a str (quote it" in err and str(path) in err
    assert not (tmp_path / "o").exists()
