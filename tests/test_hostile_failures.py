"""Hostile failures (reliability round 3, last pass): a full disk, a file size limit, Ctrl-C, pickled weights that
would run code, quantized checkpoints, the Hub unreachable, a model too large to evaluate, models refused for
the wrong reason. Each ends in one line naming the obstacle (a traceback only with -v) and leaves the user's
folder as it was, or (a failure after the work) says what was kept.
"""

import errno
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_batch import tree
from tiny_processors import write_user_folder

from atv.cli import main
from pruning.errors import ChatTemplateError, UnsupportedModelError

PRUNE = ["prune", "--model", "model", "--method", "magnitude"]
EVAL = ["eval", "--tasks", "look.jsonl", "--model", "model"]
ROOT = Path(__file__).resolve().parents[1]
COPIES = ("pickled", "quantized", "resized")  # the broken copies of the model in the user's folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A user's folder (tiny LLaVA, calibration, benchmark) plus a pickled and a bitsandbytes copy of the model."""
    base = write_user_folder(tmp_path_factory.mktemp("hostile_failures") / "base")
    shutil.copytree(base / "model", base / "pickled")
    _pickle_with_code(base / "pickled", base.parent / "PWNED")
    shutil.copytree(base / "model", base / "quantized")
    config = json.loads((base / "quantized" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "_load_in_4bit": True}
    (base / "quantized" / "config.json").write_text(json.dumps(config))
    shutil.copytree(base / "model", base / "resized")  # a processor that makes images the vision tower refuses
    processor = json.loads((base / "resized" / "processor_config.json").read_text())
    processor["image_processor"].update(crop_size={"height": 12, "width": 12}, size={"shortest_edge": 12})
    (base / "resized" / "processor_config.json").write_text(json.dumps(processor))
    return base


class _RunsCode:
    """A pickled object that runs a shell command when unpickled (what torch.load(weights_only=False) would do)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _pickle_with_code(folder: Path, sentinel: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "payload": _RunsCode(sentinel)}, folder / "pytorch_model.bin")


def _one_line(code: int, err: str, expected_code: int = 2) -> str:
    lines = [line for line in err.splitlines() if ": error: " in line or ": interrupted: " in line]
    assert code == expected_code and "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def _run(world, monkeypatch, capsys, argv, expected_code=2) -> str:
    monkeypatch.chdir(world)
    code = main(argv)
    return _one_line(code, capsys.readouterr().err, expected_code)


# -- weights that are not plain floating-point tensors ------------------------------------------------------------
def test_pickled_weights_that_would_run_code_are_refused_naming_the_call(world, monkeypatch, capsys):
    before = tree(world)
    line = _run(world, monkeypatch, capsys, ["prune", "--model", "pickled", "--method", "magnitude", "--out", "new"])
    assert "would run code (posix.system)" in line and "safetensors" in line and "UnpicklingError" not in line
    assert not (world.parent / "PWNED").exists() and tree(world) == before


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                    reason="bitsandbytes is installed here: the missing-package refusal cannot happen")
def test_a_quantized_checkpoint_without_its_package_is_one_line(world, monkeypatch, capsys):
    before = tree(world)
    line = _run(world, monkeypatch, capsys, ["prune", "--model", "quantized", "--method", "magnitude", "--out", "new"])
    assert "'quantized' is quantized (bitsandbytes), which needs a package that is not installed" in line
    assert "prune the unquantized model" in line and tree(world) == before


def test_integer_linear_weights_are_refused_before_pruning():
    from tiny_models import build_tiny

    from pruning.io import check_floating_point

    model, _ = build_tiny("llava")
    check_floating_point("tiny", model)  # a floating-point model passes
    layer = model.model.language_model.layers[0].mlp.down_proj
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match=r"'tiny' holds Linear weights of dtype torch.uint8 \(a quant"):
        check_floating_point("tiny", model)


# -- a model whose files disagree about a size: transformers' own refusal, as one line ---------------------------------
@pytest.mark.parametrize("argv", [
    ["prune", "--model", "resized", "--method", "wanda", "--calib", "calib/calib.json", "--images", "calib/images",
     "--nsamples", "1", "--out", "new"],
    ["eval", "--tasks", "look.jsonl", "--model", "resized"]], ids=["prune", "eval"])
def test_a_processor_that_disagrees_with_the_model_is_one_line(world, monkeypatch, capsys, argv):
    before = tree(world)
    line = _run(world, monkeypatch, capsys, argv)
    assert "the model's forward failed on" in line and "Input image size (12*12) doesn't match model (8*8)" in line
    assert tree(world) == before


# -- a model too large to evaluate: refused before it is loaded --------------------------------------------------
def test_eval_refuses_a_model_that_will_not_fit_before_loading_it(world, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr("pruning.memory.available_memory", lambda device: 1024)  # 1 KiB free
    monkeypatch.setattr("atv.experiments.eval_job.load_model", lambda *a, **k: loads.append(a))
    line = _run(world, monkeypatch, capsys, EVAL)
    assert "needs about" in line and "--dtype bfloat16" in line and "--no-memory-check" in line
    assert "InsufficientMemoryError" not in line and loads == []


def test_eval_no_memory_check_runs_anyway(world, monkeypatch, capsys):
    monkeypatch.setattr("pruning.memory.available_memory", lambda device: 1024)
    monkeypatch.chdir(world)
    assert main(EVAL + ["--no-memory-check"]) == 0, capsys.readouterr().err


PROBE = ["probe", "--model", "model", "--calib", "calib/calib.json", "--images", "calib/images", "--bench",
         "look.jsonl", "--nsamples", "2", "--pathways", "text", "--pools", "text", "--sparsities", "0.5"]


@pytest.mark.parametrize("extra", [[], ["--map"]], ids=["grid", "map"])
def test_probe_refuses_a_study_that_will_not_fit_before_loading(world, monkeypatch, capsys, extra):
    monkeypatch.setattr("pruning.memory.available_memory", lambda device: 1024)
    monkeypatch.setattr("pruning.io.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    before = tree(world)
    line = _run(world, monkeypatch, capsys, PROBE + extra + ["--out", "study"])
    assert "needs about" in line and "--nsamples" in line and "--no-memory-check" in line
    assert tree(world) == before


def test_probe_memory_plan_holds_the_probed_weights_and_the_larger_phase():
    from tiny_models import build_tiny

    from pruning.config import PruneConfig
    from pruning.execution import ExecutionConfig
    from pruning.memory import plan_eval_memory, plan_memory, plan_probe_memory

    model, _ = build_tiny("llava")
    probe = plan_probe_memory(PruneConfig("sparsegpt"), model.config, 4, 32, 8, "float32")
    prune = plan_memory(PruneConfig("sparsegpt"), ExecutionConfig(), model.config, 4, 32, 1, "float32")
    scoring = plan_eval_memory(model.config, 8, 32, "float32", probed=True)
    assert probe.weights == scoring.weights > prune.weights and probe.statistics == prune.statistics > 0
    assert probe.workspace == max(prune.workspace, scoring.workspace)


def test_eval_memory_plan_counts_the_probes_second_copy():
    from tiny_models import build_tiny

    from pruning.memory import model_shape, plan_eval_memory

    model, _ = build_tiny("llava")
    shape = model_shape(model.config)
    dense = plan_eval_memory(model.config, 2, 16, "float32")
    probed = plan_eval_memory(model.config, 2, 16, "float32", probed=True)
    copies = shape.layers * (shape.layer_params - shape.attn_out * shape.hidden) * 4  # q, k, v and the MLP, fp32
    assert dense.weights == shape.total_params * 4 and probed.weights - dense.weights == copies
    assert dense.workspace >= 2 * 16 * shape.vocab * 4  # the batch's fp32 logits


# -- no room to write: a full disk, a file size limit ------------------------------------------------------------
def test_a_full_disk_while_saving_removes_the_partial_output(world, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    before = tree(world)
    line = _run(world, monkeypatch, capsys, PRUNE + ["--out", "new"])
    assert "no space is left on the device (ENOSPC) while writing 'new'; the partial output was removed" in line
    assert tree(world) == before and not any(p.name.startswith(".new.") for p in world.iterdir())


def test_a_full_disk_leaves_the_results_log_at_its_last_complete_record(tmp_path, monkeypatch):
    from atv.experiments import records as records_module
    from atv.experiments.records import ResultLog
    from pruning.errors import OutputWriteError

    log = ResultLog(tmp_path / "study", {"model": "m"})
    log.append({"cell": {"pathway": "dense"}, "mean_retention": 100.0})
    kept = log.path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records_module.os, "fsync", full)
    with pytest.raises(OutputWriteError, match=r"no space is left on the device \(ENOSPC\) while writing .*results"
                                               r"\.jsonl'; the records before this one are kept"):
        log.append({"cell": {"pathway": "text", "pool": "text", "sparsity": 0.5}, "mean_retention": 90.0})
    assert log.path.read_bytes() == kept  # no torn record


def test_a_file_size_limit_is_one_line_and_leaves_nothing(world, tmp_path):
    """A real process under RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    shutil.copytree(world, tmp_path / "user", ignore=shutil.ignore_patterns(*COPIES))
    user = tmp_path / "user"
    before = tree(user)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the tiny model's weights are larger

    done = subprocess.run([sys.executable, "-m", "atv.cli", *PRUNE, "--out", "new"], cwd=user, preexec_fn=limit,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = _one_line(done.returncode, done.stderr)
    assert "a file grew past the size limit (EFBIG) while writing 'new'; the partial output was removed" in line
    assert tree(user) == before and sorted(p.name for p in user.iterdir()) == sorted(
        p.name for p in world.iterdir() if p.name not in COPIES)


# -- Ctrl-C -------------------------------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_leaves_the_folder_as_it_was(world, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("atv.experiments.prune_job.prune_", interrupted)
    before = tree(world)
    line = _run(world, monkeypatch, capsys, PRUNE + ["--out", "new"], expected_code=130)
    assert line.startswith("atv prune: interrupted: partial outputs were removed and nothing was replaced")
    assert tree(world) == before and not (world / "new").exists()


def test_verbose_keeps_the_traceback(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    assert main(["-v", *PRUNE, "--seed", "-1", "--out", "new"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "atv prune: error: seed must be in [0, 2**32)" in err


# -- the Hub: checked before the work, a failed upload says what was kept -------------------------------------------
def test_push_to_hub_with_the_hub_switched_off_is_refused_before_work(world, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = tree(world)
    line = _run(world, monkeypatch, capsys, PRUNE + ["--out", "new", "--push-to-hub", "me/tiny"])
    assert "HF_HUB_OFFLINE is set" in line and "hf upload me/tiny new" in line and tree(world) == before


def test_push_to_hub_without_network_is_refused_before_work(world, monkeypatch, capsys):
    import huggingface_hub

    class NoNetwork:
        def whoami(self):
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    monkeypatch.setattr("atv.experiments.prune_job.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    before = tree(world)
    line = _run(world, monkeypatch, capsys, PRUNE + ["--out", "new", "--push-to-hub", "me/tiny"])
    assert "the Hub cannot be reached with a token it accepts (ConnectionError: [Errno -2] Name or service" in line
    assert "hf auth login" in line and tree(world) == before


def test_an_upload_that_fails_after_saving_says_where_the_model_is(world, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    class DropsOut:
        def whoami(self):
            return {"name": "me"}

        def create_repo(self, *args, **kwargs):
            raise ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub, "HfApi", DropsOut)
    out = tmp_path / "pruned"
    line = _run(world, monkeypatch, capsys, PRUNE + ["--out", str(out), "--push-to-hub", "me/tiny"])
    assert f"the pruned model is saved in {str(out)!r}, but uploading it to 'me/tiny' failed" in line
    assert f"hf upload me/tiny {out}" in line and (out / "model.safetensors").is_file()


# -- templates that build values too large to hold ---------------------------------------------------------------
def test_a_template_that_runs_out_of_memory_is_one_line():
    from pruning.templates import render_chat

    class Huge:
        name_or_path = "huge-template"

        def apply_chat_template(self, messages, tokenize, **kwargs):
            raise MemoryError

    with pytest.raises(ChatTemplateError, match=r"'huge-template' built a value too large to hold \(MemoryError\)"):
        render_chat(Huge(), [{"role": "user", "content": "hi"}])


# -- refusals name the real obstacle ------------------------------------------------------------------------------
def _meta_model(model_type: str):
    import transformers as tf
    from tiny_families import shrink
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with torch.device("meta"):
        return tf.AutoModelForImageTextToText.from_config(shrink(CONFIG_MAPPING[model_type]()))


def test_blip_is_refused_for_its_cross_attending_decoder_not_a_missing_head():
    from pruning.adapters import get_adapter

    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(_meta_model("blip"))
    message = str(info.value)
    assert "text decoder (text_decoder) that reads the image through cross-attention" in message
    assert "no causal LM head" not in message and "AutoModelForImageTextToText" not in message


@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_action_models_are_refused_for_predicting_no_tokens_not_told_to_reload(model_type):
    from pruning.adapters import get_adapter

    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(_meta_model(model_type))
    message = str(info.value)
    assert "returns no next-token logits" in message and "action_out_proj" in message
    assert "load it with" not in message


def test_the_families_table_builds_what_the_sweep_used_to_call_not_built():
    """diffusion_gemma (MoE sizes its default config leaves None) and evolla (a class the Auto class does not take
    for its config) are built, and their rows come from running discovery and the refusal checks."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from families_table import sweep_row
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    gemma, evolla = sweep_row("diffusion_gemma"), sweep_row("evolla")
    assert "not built" not in gemma and "not built" not in evolla
    assert gemma.startswith("| diffusion_gemma | refused: ") and "decoder_input_ids" in gemma
    assert evolla.startswith("| evolla | 2 at `model.layers` ")


def test_an_earlier_versions_offload_folder_is_named_and_kept(tmp_path, caplog):
    """Earlier versions named the folder without a PID: whether its run still works cannot be told, so it is
    kept and named (with its size) instead of silently left behind."""
    from pruning.outputs import scratch_folder

    legacy = tmp_path / ".atv-offload-k3j_9x0a"
    legacy.mkdir()
    (legacy / "layer.dat").write_bytes(b"\0" * 2**20)
    with scratch_folder(tmp_path, ".atv-offload-") as path:
        assert path.is_dir()
    assert legacy.is_dir() and ".atv-offload-k3j_9x0a (1.0 MB) was left by a run of an earlier" in caplog.text


def test_a_head_hidden_inside_the_language_model_is_named_not_called_missing():
    """nemotron_h_omni returns logits from its language_model's own head, which get_output_embeddings() does
    not expose: the refusal says so (an adapter could name the head), not that the model predicts no tokens."""
    from pruning.adapters import get_adapter

    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(_meta_model("nemotron_h_omni"))
    message = str(info.value)
    assert "exposes no causal LM head (get_output_embeddings() is None) although its language_model has one" in message
    assert "returns no next-token logits" not in message
