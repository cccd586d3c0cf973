"""Hostile inputs to a study's fingerprints: shard files of another setup merged in, a probe cell re-created
after its model or calibration changed, a foreign dense fidelity reference, a study.json whose fingerprints are
missing or garbled, and checkpoints whose weights do not fill the model their config builds. Each is refused
with one line naming what differs."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from atv.cli import main
from atv.experiments.cells import REFERENCE, load_reference
from atv.experiments.records import RESULTS, SETUP, ResultLog, Shard
from evaluation.harness import FidelityReference
from pruning.errors import ToolkitError

CHOICE = str(Path(__file__).resolve().parent / "lmms_tasks" / "atv_tiny_choice.jsonl")
GRID = ["--sparsities", "0.5", "--pathways", "text", "--pools", "visual", "--batch-size", "2"]  # dense + 1 cell


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny LLaVA folders (other weights, same config) and a calibration file."""
    tmp = tmp_path_factory.mktemp("fingerprints")
    models = [save_model_dir("llava", build_tiny("llava", seed=seed)[0], tmp / f"model{seed}") for seed in (0, 1)]
    calib, images = write_calibration(tmp / "calib", n=3)
    return tmp, models, calib, images


def _probe(files, model: Path, out: Path, *extra: str) -> list[str]:
    _, _, calib, images = files
    return ["probe", "--model", str(model), "--calib", str(calib), "--images", str(images), "--bench", CHOICE,
            "--nsamples", "3", *GRID, "--out", str(out), *extra]


def _refused(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()  # what earlier runs wrote
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("atv ")]
    assert len(errors) == 1, errors  # one line (transformers may log its load report above it)
    err = errors[0]
    for needle in needles:
        assert needle in err, err
    return err


# -- 1. shards and merges check the study's fingerprints --------------------------------------------------------
def test_merge_refuses_a_shard_file_copied_from_another_study(files, tmp_path, capsys):
    _, (model, other), _, _ = files
    assert main(_probe(files, model, tmp_path / "a", "--shard", "1/2")) == 0
    assert main(_probe(files, other, tmp_path / "b", "--shard", "2/2")) == 0
    shutil.copy(tmp_path / "b" / "records.shard-2-of-2.jsonl", tmp_path / "a")
    for extra in (["--merge"], []):  # a merge, and a rerun on the whole log
        _refused(capsys, _probe(files, model, tmp_path / "a", *extra), "records.shard-2-of-2.jsonl: record 1",
                 "model weights")
    assert not (tmp_path / "a" / RESULTS).exists()


def _measure(cell, _shared=None):
    return {"cell": cell, "scores": {"bench": 50.0}, "metrics": {"bench": {}}, "prune": None, "seconds": 1.0,
            "environment": {}}


SETUP_A = {"config": {"seed": 0}, "model": "m", "inputs": {"model weights": "aaa", "calibration file": "ccc"}}


@pytest.mark.parametrize("other, differs", [
    ({**SETUP_A, "inputs": {"model weights": "bbb", "calibration file": "ccc"}}, "differs in model weights"),
    ({**SETUP_A, "model": "m2"}, "differs in model"),
    ({**SETUP_A, "config": {"seed": 1}}, "differs in config"),
])
def test_shards_started_at_once_with_other_setups_are_not_merged(tmp_path, other, differs):
    # both shards open the folder before either pinned its setup (as two jobs of an array may), then write
    first, second = ResultLog(tmp_path, SETUP_A, Shard(1, 2)), ResultLog(tmp_path, other, Shard(2, 2))
    first.append(_measure({"method": "dense"}))
    second.append(_measure({"method": "a"}))
    saved = json.loads((tmp_path / SETUP).read_text())
    with pytest.raises(ToolkitError, match=r"records\.shard-[12]-of-2\.jsonl: record 1 was measured with another "
                                           rf"setup or inputs \({differs}"):
        ResultLog(tmp_path, saved)


def test_a_shard_file_without_fingerprints_is_refused(tmp_path):
    ResultLog(tmp_path, SETUP_A, Shard(1, 2)).append(_measure({"method": "dense"}))
    (tmp_path / "records.shard-2-of-2.jsonl").write_text(json.dumps(_measure({"method": "a"})) + "\n")
    with pytest.raises(ToolkitError, match=r"records\.shard-2-of-2\.jsonl: record 1 carries no fingerprint"):
        ResultLog(tmp_path, SETUP_A)


# -- 2.-4. a study whose inputs or fingerprints changed ----------------------------------------------------------
@pytest.fixture
def study(files, tmp_path):
    """A finished probe study (dense + text/visual/0.5) on its own copies of the model and calibration file."""
    _, (model, _), calib, images = files
    own = shutil.copytree(model, tmp_path / "model")
    own_calib = shutil.copy(calib, tmp_path / "calib.json")
    argv = ["probe", "--model", str(own), "--calib", str(own_calib), "--images", str(images), "--bench", CHOICE,
            "--nsamples", "3", *GRID, "--out", str(tmp_path / "study")]
    assert main(argv) == 0
    return argv, tmp_path / "study", own, Path(own_calib)


def _change(files, what: str, model: Path, calib: Path) -> None:
    if what == "model weights":
        shutil.copy(files[1][1] / "model.safetensors", model / "model.safetensors")
    else:
        calib.write_text(json.dumps(json.loads(calib.read_text()), indent=1))  # same records, other bytes


@pytest.mark.parametrize("what", ["model weights", "calibration file"])
def test_eval_of_a_probe_cell_refuses_changed_inputs(files, study, capsys, what):
    _, out, model, calib = study
    _change(files, what, model, calib)
    _refused(capsys, ["eval", "--probe-from", f"{out}:text/visual/0.5", "--tasks", CHOICE],
             f"input changed since the study in {out} ran: {what}")


@pytest.mark.parametrize("inputs, state", [(None, "has no 'inputs' entry"), ("garbled", "has a garbled 'inputs'"),
                                           ({"model weights": 3}, "has a garbled 'inputs'")])
@pytest.mark.parametrize("command", ["probe", "eval"])
def test_a_setup_without_its_fingerprints_cannot_be_verified(files, study, capsys, inputs, state, command):
    argv, out, model, calib = study
    setup = json.loads((out / SETUP).read_text())
    if inputs is None:
        del setup["inputs"]
    else:
        setup["inputs"] = inputs
    (out / SETUP).write_text(json.dumps(setup))
    _change(files, "model weights", model, calib)
    if command == "eval":
        argv = ["eval", "--probe-from", f"{out}:text/visual/0.5", "--tasks", CHOICE]
    _refused(capsys, argv, f"{out / SETUP} {state}", "cannot be verified")


# -- 3. the dense fidelity reference --------------------------------------------------------------------------
class Fidelity:
    kind, name = "fidelity", "fid"


def _reference() -> FidelityReference:
    return FidelityReference({"fid": {}}, top_k=4)


@pytest.mark.parametrize("placed, why", [
    ("copied", r"its setup differs in model weights"),
    ("by hand", r"it records no setup it was computed from"),
])
def test_a_foreign_fidelity_reference_is_refused(tmp_path, placed, why):
    (tmp_path / "b").mkdir()
    if placed == "copied":  # from another study's folder
        load_reference(ResultLog(tmp_path / "a", SETUP_A), [Fidelity()], _reference)
        shutil.copy(tmp_path / "a" / REFERENCE, tmp_path / "b" / REFERENCE)
    else:
        _reference().save(tmp_path / "b" / REFERENCE)
    other = {**SETUP_A, "inputs": {"model weights": "bbb", "calibration file": "ccc"}}
    with pytest.raises(ToolkitError, match=rf"{REFERENCE} is not this study's dense reference \({why}\); delete it"):
        load_reference(ResultLog(tmp_path / "b", other), [Fidelity()], lambda: pytest.fail("recomputed"))


def test_the_studys_own_fidelity_reference_is_reused(tmp_path):
    first = load_reference(ResultLog(tmp_path, SETUP_A), [Fidelity()], _reference)
    again = load_reference(ResultLog(tmp_path, SETUP_A), [Fidelity()], lambda: pytest.fail("recomputed"))
    assert again == first and again.source == first.source is not None


# -- 5. checkpoints that do not fill their model ---------------------------------------------------------------
def _drop_weight(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    del weights["language_model.model.layers.0.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(key: str, delta: int):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["text_config"][key] += delta
        (folder / "config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("damage, named", [
    (_drop_weight, "missing: model.language_model.layers.0.mlp.down_proj.weight"),
    (_edit_config("num_hidden_layers", 1), "missing: model.language_model.layers.2."),
    (_edit_config("intermediate_size", 4), "of another shape than the config's: model.language_model.layers.0.mlp"),
])
def test_an_incomplete_checkpoint_is_refused(files, tmp_path, capsys, damage, named):
    model = shutil.copytree(files[1][0], tmp_path / "model")
    damage(model)
    err = _refused(capsys, ["prune", "--model", str(model), "--method", "magnitude", "--sparsity", "0.5",
                            "--out", str(tmp_path / "out")],
                   f"the checkpoint in {str(model)!r} is incomplete or does not match its config.json", named)
    assert "re-save the model with save_pretrained or fix its config" in err
    assert not (tmp_path / "out").exists()


def test_weights_the_model_does_not_use_are_dropped_with_a_warning(files, tmp_path, caplog):
    """An unused weight (many Hub checkpoints carry a head the model class has no place for) leaves the model
    whole: it loads, with the weight named in a warning, and prunes exactly as the clean folder does."""
    import torch

    from pruning.io import load_model

    model_dir = shutil.copytree(files[1][0], tmp_path / "model")
    weights = load_file(model_dir / "model.safetensors")
    save_file({**weights, "unused_head.weight": torch.ones(2, 2)}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="pruning.io"):
        loaded, _ = load_model(model_dir, with_processor=False)
    assert "unused_head.weight" in caplog.text and "they are ignored" in caplog.text
    clean, _ = load_model(files[1][0], with_processor=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), clean.state_dict().values()))
