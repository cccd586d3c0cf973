"""`atv prune` end to end on tiny LLaVA-NeXT and Qwen2-VL checkpoints: prune, save, reload, check."""

import json

import pytest
import torch
from tiny_models import build_tiny
from tiny_processors import make_processor, save_model_dir, write_calibration
from transformers import AutoModelForImageTextToText

from atv.cli import main
from atv.experiments.prune_job import PruneJob, run_prune_job
from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.errors import CalibrationError, OutputExistsError


def _checkpoint(tmp_path, family):
    model, _ = build_tiny(family)
    return save_model_dir(family, model, tmp_path / f"{family}-dense")


def _check_reloaded(out, sparsity):
    report = json.loads((out / "prune_report.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(out)
    adapter = get_adapter(model)
    for layer in report["layers"]:
        for name, linear in adapter.named_linears(model, layer["index"]).items():
            measured = float((linear.weight == 0).float().mean())
            assert measured == pytest.approx(layer["sparsity"][name], abs=1e-9)
            expected = int(linear.in_features * sparsity) / linear.in_features  # exact per row
            assert measured == pytest.approx(expected, abs=1e-9)
    return report


def test_cli_prunes_llava_next_and_the_saved_model_reloads(tmp_path, capsys):
    model_dir = _checkpoint(tmp_path, "llava_next")
    calib, images = write_calibration(tmp_path / "calib", n=4, with_bad=True)
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(model_dir), "--method", "atv", "--sparsity", "0.5", "--calib", str(calib),
                 "--images", str(images), "--nsamples", "3", "--seed", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = _check_reloaded(out, 0.5)
    assert report["samples"] == 3 and report["calibration"]["used"] == 3
    assert all(layer["visual_selected"] > 0 for layer in report["layers"])
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()


def test_cli_nm_pattern(tmp_path):
    model_dir = _checkpoint(tmp_path, "llava_next")
    calib, images = write_calibration(tmp_path / "calib", n=2)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "wanda", "--pattern", "2:4", "--calib", str(calib),
                 "--images", str(images), "--nsamples", "2", "--out", str(out)]) == 0
    _check_reloaded(out, 0.5)


def test_qwen2_vl_prune_job_end_to_end(tmp_path):
    # Qwen2-VL's stock processor needs torchvision in transformers 5 (not installable beside this CPU torch),
    # so the job gets an image-only processor built in memory; everything else is the CLI's path.
    model, _ = build_tiny("qwen2_vl")
    model_dir = tmp_path / "qwen"
    model.save_pretrained(model_dir)
    calib, images = write_calibration(tmp_path / "calib", n=3)
    job = PruneJob(model=model_dir, out=tmp_path / "pruned", config=PruneConfig("atv", sparsity=0.6),
                   calib=calib, images=images, nsamples=3)
    run_prune_job(job, progress=False, processor=make_processor("qwen2_vl", model))
    _check_reloaded(tmp_path / "pruned", 0.6)


def test_output_folder_with_a_model_is_refused_before_work(tmp_path, capsys):
    model_dir = _checkpoint(tmp_path, "llava_next")
    before = sorted(p.name for p in model_dir.iterdir())
    code = main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(model_dir)])
    assert code == 2 and "already holds a model" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == before
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_prune_job(PruneJob(model=model_dir, out=model_dir, config=PruneConfig("magnitude")))


@pytest.mark.parametrize("argv, message", [
    (["--method", "obs"], "unknown method 'obs'"),
    (["--sparsity", "1.5"], "got 1.5"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pool", "pixels"], "unknown pool 'pixels'"),
    (["--method", "wanda"], "needs --calib and --images"),
])
def test_cli_bad_input_is_reported_without_output(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    code = main(["prune", "--model", str(tmp_path), "--out", str(out), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_run_leaves_no_half_written_model(tmp_path, monkeypatch):
    model_dir = _checkpoint(tmp_path, "llava_next")
    calib, images = write_calibration(tmp_path / "calib", n=2)
    out = tmp_path / "pruned"
    with pytest.raises(CalibrationError, match="only 2 usable"):
        run_prune_job(PruneJob(model=model_dir, out=out, config=PruneConfig("wanda"), calib=calib, images=images,
                               nsamples=5), progress=False)
    assert not out.exists()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.ProcessorMixin.save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        run_prune_job(PruneJob(model=model_dir, out=out, config=PruneConfig("magnitude")), progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def test_unsupported_architecture_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(text_only)
    code = main(["prune", "--model", str(text_only), "--method", "magnitude", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "'llama'" in err and "image-text-to-text" in err
    assert not (tmp_path / "out").exists()


def test_pruned_folder_says_what_it_is(tmp_path, capsys):
    """config.json carries a sparsity_config in compressed-tensors' schema (not under quantization_config),
    the folder a model card with Hub front matter, and the report the environment and the command."""
    model_dir = _checkpoint(tmp_path, "llava_next")
    calib, images = write_calibration(tmp_path / "calib", n=3)
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--method", "wanda", "--pattern", "2:4", "--calib", str(calib),
            "--images", str(images), "--nsamples", "2", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    entry = config["sparsity_config"]
    assert "quantization_config" not in config
    assert entry["format"] == "dense" and entry["sparsity_structure"] == "2:4"
    assert entry["global_sparsity"] == pytest.approx(0.5)
    compressed = pytest.importorskip("compressed_tensors.config")
    validated = compressed.SparsityCompressionConfig.load_from_registry(entry["format"], **{
        k: v for k, v in entry.items() if k != "format"})
    assert validated.sparsity_structure == "2:4"
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert reloaded.config.sparsity_config["global_sparsity"] == entry["global_sparsity"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "pipeline_tag: image-text-to-text" in card
    assert "| layer |" in card and "atv prune --model" in card and "wanda" in card
    report = json.loads((out / "prune_report.json").read_text())
    assert report["environment"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        report["environment"]["versions"]["torch"] == torch.__version__
    assert report["command"].startswith("atv prune --model ")
    assert report["calibration"]["source"] == str(calib) and len(report["calibration"]["ids"]) == 2


def test_pruned_folder_reloads_without_compressed_tensors(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(_checkpoint(tmp_path, "llava")), "--method", "magnitude",
                 "--out", str(out)]) == 0
    code = ("import sys; sys.modules['compressed_tensors'] = None\n"
            "from transformers import AutoModelForImageTextToText\n"
            f"m = AutoModelForImageTextToText.from_pretrained({str(out)!r})\n"
            "print(m.config.sparsity_config['sparsity_structure'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "unstructured"


def test_eval_appends_to_the_card_and_push_uploads_the_folder(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    import huggingface_hub

    uploads = []

    class FakeApi:  # offline: the Hub calls are recorded, not made
        def whoami(self):
            uploads.append(("whoami",))
            return {"name": "me"}

        def create_repo(self, repo, private, exist_ok, repo_type):
            uploads.append(("create", repo, private))
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(_checkpoint(tmp_path, "llava")), "--method", "magnitude", "--out", str(out),
                 "--push-to-hub", "me/tiny-pruned", "--private"]) == 0, capsys.readouterr().err
    assert uploads[0] == ("whoami",)  # the Hub and the token checked before any work
    assert uploads[1] == ("create", "me/tiny-pruned", True)
    assert {"README.md", "recipe.yaml", "prune_report.json", "config.json", "model.safetensors"} <= set(uploads[2][2])
    bench = str(Path(__file__).resolve().parent / "lmms_tasks" / "atv_tiny_choice.jsonl")
    assert main(["eval", "--model", str(out), "--tasks", bench, "--out-card"]) == 0, capsys.readouterr().err
    card = (out / "README.md").read_text()
    assert "No evaluation recorded yet" not in card and "| atv_tiny_choice | choice score (%) |" in card
    assert main(["eval", "--model", str(tmp_path / "llava-dense"), "--tasks", bench, "--out-card"]) == 2
    assert "holds no README.md" in capsys.readouterr().err
