"""Model loading shared by `atv prune`, `atv probe` and `atv eval`: a Hub id from a local hub cache
(offline), revisions, the checkpoint's own dtype by default, accelerate device maps, and clear refusals."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import build_tiny
from tiny_processors import save_model_dir

from atv.experiments.prune_job import PruneJob, run_prune_job
from pruning.config import PruneConfig
from pruning.engine import compute_masks
from pruning.errors import ConfigError, UnsupportedModelError
from pruning.io import LoadOptions, load_model, resolve_model, save_pruned

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, _ = build_tiny("llava")
    return save_model_dir("llava", model, tmp_path_factory.mktemp("load") / "model")


def _hub_cache(root: Path, repo: str, folder: Path, refs: dict[str, Path]) -> Path:
    """``folder``'s files in the hub cache layout: models--org--name/{refs/<ref>, snapshots/<hash>/}."""
    base = root / ("models--" + repo.replace("/", "--"))
    for i, (ref, source) in enumerate(refs.items()):
        commit = f"{i + 1:040x}"
        shutil.copytree(source, base / "snapshots" / commit)
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / ref).write_text(commit)
    return root


def _prune_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atv.cli", "prune", "--method", "magnitude", "--sparsity", "0.5",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_hub_id_loads_offline_from_the_cache_with_revisions(folder, tmp_path):
    other, _ = build_tiny("llava", seed=1)
    other_dir = save_model_dir("llava", other, tmp_path / "other")
    cache = _hub_cache(tmp_path / "hub", "atv-test/tiny-llava", folder, {"main": folder, "v2": other_dir})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    runs = {"local": [str(folder)], "main": ["atv-test/tiny-llava"], "v2": ["atv-test/tiny-llava", "--revision", "v2"],
            "other": [str(other_dir)]}
    for name, model in runs.items():
        done = _prune_cli(env, "--model", *model, "--out", str(tmp_path / f"pruned-{name}"))
        assert done.returncode == 0, done.stderr
    local, main, v2, other_w = (_weights(tmp_path / f"pruned-{n}") for n in ("local", "main", "v2", "other"))
    assert all(local[k].equal(main[k]) for k in local)  # the id resolves to the cached snapshot of main
    assert all(other_w[k].equal(v2[k]) for k in other_w)  # --revision picks the other snapshot
    assert any(not local[k].equal(v2[k]) for k in local)
    done = _prune_cli(env, "--model", "atv-test/no-such-model", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot load model 'atv-test/no-such-model'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_dtype_auto_keeps_a_bf16_checkpoint_bf16(tmp_path):
    model, _ = build_tiny("llava")
    model_dir = save_model_dir("llava", model.to(torch.bfloat16), tmp_path / "bf16")
    loaded, _ = load_model(model_dir, with_processor=False)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    run_prune_job(PruneJob(model=str(model_dir), out=tmp_path / "pruned", config=PruneConfig("magnitude")),
                  progress=False)
    saved = _weights(tmp_path / "pruned")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert load_model(model_dir, "float32", with_processor=False)[0].dtype == torch.float32  # explicit dtype wins


def test_loaded_model_keeps_transformers_modules_and_the_reload_check_runs(folder, tmp_path, caplog):
    """transformers 5.25 swaps Hub kernels into every from_pretrained by default (and its kernelize refuses the
    meta device the reload check loads on): the toolkit loads the modules transformers defines, and saving
    verifies the reload instead of warning that it could not."""
    model, _ = load_model(folder, with_processor=False)
    assert not getattr(model, "use_kernels", False)
    with caplog.at_level("WARNING", logger="pruning.io"):
        save_pruned(model, None, {}, tmp_path / "out")
    assert not [r for r in caplog.records if "could not verify" in r.getMessage()]


@pytest.mark.parametrize("device_map", ["cpu", "auto", "sequential"])
def test_device_map_gives_the_same_masks(folder, device_map):
    """On a CPU-only machine every map places the whole model on the CPU (transformers then attaches no
    dispatch hooks): the masks must be those of a plain load. Multi-device maps are exercised on GPUs."""
    _, batch = build_tiny("llava")
    config = PruneConfig("wanda", sparsity=0.5)
    plain, _ = load_model(folder, with_processor=False)
    dispatched, _ = load_model(folder, LoadOptions(device_map=device_map), with_processor=False)
    assert {p.device.type for p in dispatched.parameters()} == {"cpu"}
    expected = compute_masks(plain, config, [batch], progress=False).masks
    got = compute_masks(dispatched, config, [batch], progress=False).masks
    assert sorted(got) == sorted(expected) and all(got[k].equal(expected[k]) for k in got)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"device_map": "everywhere"}, "device_map must be one of"),
    ({"device_map": "auto", "device": "cpu"}, "give one"),
    ({"max_memory": ("0=1GiB",)}, "give device_map too"),
    ({"device_map": "auto", "max_memory": ("20GiB",)}, "DEVICE=SIZE"),
])
def test_bad_load_options_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoadOptions(**kwargs)


def test_model_argument_is_a_folder_or_a_hub_id(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(UnsupportedModelError, match="neither a model folder nor a Hub id"):
        resolve_model(tmp_path / "missing" / "deeper" / "x")
    assert resolve_model("org/name") == "org/name"


def test_a_checkpoint_that_would_not_reload_is_refused_and_nothing_is_written(tmp_path):
    """transformers 5.24 saves a shieldgemma2-typed Gemma3ForConditionalGeneration under key names its
    loader maps for another class: a reload would leave the language model random (with a warning only)."""
    import transformers as tf
    from tiny_kit import shrink
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = shrink(CONFIG_MAPPING["shieldgemma2"]())
    config.vision_config.image_size, config.vision_config.patch_size, config.mm_tokens_per_image = 8, 2, 4
    config.vision_config.hidden_size, config.vision_config.intermediate_size = 32, 64
    model = tf.AutoModelForImageTextToText.from_config(config)
    with pytest.raises(UnsupportedModelError, match=r"would not reload: transformers finds \d+ weights missing"):
        save_pruned(model, None, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_no_accelerator_is_none_even_where_torch_raises(monkeypatch):
    """torch 2.6's current_accelerator() raises when there is none (later releases return None): the toolkit
    asks it only when one is available, so a CPU-only machine with a CUDA build of torch 2.6 loads and evaluates."""
    from evaluation import processes
    from pruning import io

    def raises():
        raise RuntimeError("Cannot access accelerator device when none is available.")

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", raises)
    assert io.current_accelerator() is None and not processes._accelerator_present()
    assert io._device_count("cuda") == 0
    with pytest.raises(UnsupportedModelError, match="is not available: this torch sees 0 cuda device"):
        io.check_device("cuda:0")
