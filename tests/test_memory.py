"""The memory plan: its arithmetic on hand-computable configs, its agreement with a built model and with the
peak RSS of a real (small but not toy) pruning run, and `atv prune` refusing a run that will not fit."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from atv.cli import main
from pruning import ExecutionConfig, PruneConfig
from pruning.errors import InsufficientMemoryError
from pruning.memory import _meminfo_available, available_memory, check_memory, model_shape, plan_memory

ROOT = Path(__file__).resolve().parents[1]

# hidden 8, intermediate 16, 2 layers, vocab 10, 2 heads (head_dim 4), no vision tower, untied head
HAND = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, vocab_size=10, num_attention_heads=2,
                       num_key_value_heads=2, tie_word_embeddings=False, dtype="float32")
LAYER = 4 * 8 * 8 + 3 * 8 * 16   # q, k, v, o (8x8) + gate, up, down (8x16) = 640 parameters
OTHER = 2 * 10 * 8               # embeddings + head = 160
DISTINCT = 8 + 8 + 8 + 16        # inputs of q/k/v, o, gate/up, down = 40 features
PER_LINEAR = 3 * 8 + 8 + 2 * 8 + 16  # = 64 features


def test_shape_of_a_hand_config():
    shape = model_shape(HAND)
    assert (shape.layer_params, shape.other_params, shape.total_params) == (LAYER, OTHER, 2 * LAYER + OTHER)
    assert shape.in_features("mlp.down_proj") == 16 and shape.in_features("self_attn.q_proj") == 8


def test_weights_activations_statistics_by_hand():
    plan = plan_memory(PruneConfig("wanda"), ExecutionConfig(), HAND, 3, 5, 1, "auto")
    assert plan.weights == (2 * LAYER + OTHER) * 4
    assert plan.activations == 3 * 5 * 8 * 4          # samples x tokens x hidden x fp32
    assert plan.statistics == DISTINCT * 4            # one fp32 per distinct input feature
    assert plan.stash == 0 and plan.schedule == "two-pass"
    bf16 = plan_memory(PruneConfig("wanda"), ExecutionConfig(), HAND, 3, 5, 1, "bfloat16")
    assert (bf16.weights, bf16.activations, bf16.statistics) == (plan.weights // 2, plan.activations // 2, DISTINCT * 4)
    offloaded = plan_memory(PruneConfig("wanda"), ExecutionConfig(offload=True), HAND, 3, 5, 1, "float32")
    assert offloaded.weights == (OTHER + 2 * LAYER) * 4   # one decoder layer at a time (+ its file pages)
    dense = plan_memory(PruneConfig("wanda", propagate="dense"), ExecutionConfig(), HAND, 3, 5, 1, "float32")
    assert dense.activations == 2 * plan.activations


def test_sparsegpt_hessians_and_magnitude_without_calibration():
    plan = plan_memory(PruneConfig("sparsegpt"), ExecutionConfig(), HAND, 3, 5, 1, "float32")
    assert plan.statistics == (8 * 8 * 3 + 16 * 16) * 4  # one in x in fp32 Hessian per distinct input
    magnitude = plan_memory(PruneConfig("magnitude"), ExecutionConfig(), HAND, 3, 5, 1, "float32")
    assert magnitude.activations == magnitude.statistics == magnitude.stash == 0


def test_atv_stash_follows_the_schedule():
    tokens = 3 * 5
    two = plan_memory(PruneConfig("atv"), ExecutionConfig(schedule="two-pass"), HAND, 3, 5, 1, "float32")
    assert two.schedule == "two-pass" and two.stash == tokens * (DISTINCT * 4 + 4)  # inputs + each token's drift
    three = plan_memory(PruneConfig("atv"), ExecutionConfig(schedule="three-pass"), HAND, 3, 5, 1, "float32")
    assert three.schedule == "three-pass" and three.stash == 0
    # 'auto' applies the engine's rule: tokens x features of every target Linear x dtype bytes vs the budget
    fits = tokens * PER_LINEAR * 4 / 2**30
    assert plan_memory(PruneConfig("atv"), ExecutionConfig(stash_budget_gb=fits), HAND, 3, 5, 1,
                       "float32").schedule == "two-pass"
    assert plan_memory(PruneConfig("atv"), ExecutionConfig(stash_budget_gb=fits * 0.99), HAND, 3, 5, 1,
                       "float32").schedule == "three-pass"
    # activations moved off the compute device: one stashed copy per Linear, on the activations' device
    moved = plan_memory(PruneConfig("atv"), ExecutionConfig(offload=True, execution_device="cuda:0",
                                                             schedule="two-pass"), HAND, 3, 5, 1, "float32")
    assert moved.stash == tokens * (PER_LINEAR * 4 + 4)
    assert moved.devices["stash"] == moved.devices["activations"] == "cpu" and moved.devices["weights"] == "cuda:0"
    assert set(moved.by_device()) == {"cpu", "cuda:0"} and sum(moved.by_device().values()) == moved.peak()


def test_layer_params_match_a_built_model():
    model, _ = build_tiny("llava")
    layer = model.model.language_model.layers[0]
    linears = sum(m.weight.numel() for n, m in layer.named_modules() if n.endswith("_proj"))
    assert model_shape(model.config).layer_params == linears


def test_check_refuses_and_names_the_remedies():
    plan = plan_memory(PruneConfig("atv"), ExecutionConfig(), HAND, 3, 5, 1, "float32")
    assert check_memory(plan, lambda device: plan.peak()) == {"cpu": plan.peak()}
    with pytest.raises(InsufficientMemoryError, match="--offload.*--nsamples.*three-pass"):
        check_memory(plan, lambda device: plan.peak() - 1)
    assert check_memory(plan, lambda device: None) == {}  # unknown: not checked


def test_available_memory_reads_meminfo(tmp_path):
    if sys.platform.startswith("linux"):
        fake = tmp_path / "meminfo"
        fake.write_text("MemTotal:       1000 kB\nMemAvailable:    512 kB\n")
        assert _meminfo_available(fake) == 512 * 1024
    assert available_memory("cpu") > 0


def test_cli_refuses_a_run_that_will_not_fit(tmp_path, capsys, monkeypatch):
    model, _ = build_tiny("llava_next")
    model_dir = save_model_dir("llava_next", model, tmp_path / "dense")
    calib, images = write_calibration(tmp_path / "calib", n=2)
    monkeypatch.setattr("pruning.memory.available_memory", lambda device: 1024)  # 1 KiB free
    args = ["prune", "--model", str(model_dir), "--method", "wanda", "--calib", str(calib), "--images", str(images),
            "--nsamples", "2", "--out", str(tmp_path / "pruned")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "InsufficientMemory" not in err and "--offload" in err and "--schedule three-pass" in err
    assert not (tmp_path / "pruned").exists()
    assert main(args + ["--no-memory-check"]) == 0
    assert (tmp_path / "pruned" / "prune_report.json").is_file()


RSS_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from transformers import LlavaConfig, LlavaForConditionalGeneration
from pruning import ExecutionConfig, PruneConfig, prune_
from pruning.memory import plan_memory

def rss(field="VmRSS"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def llava(hidden, intermediate, layers, heads):
    return LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=2048, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads),
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=4, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, projection_dim=64),
        image_token_id=2000, vision_feature_layer=-1, vision_feature_select_strategy="default")

def calibration(n, text):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.cat([torch.randint(1, 1999, (8,), generator=g), torch.full((64,), 2000),
                         torch.randint(1, 1999, (text - 8,), generator=g)]).unsqueeze(0)
        batches.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                            pixel_values=torch.randn(1, 3, 32, 32, generator=g)))
    return batches

torch.set_num_threads(1)
prune_config, execution = PruneConfig("atv"), ExecutionConfig(schedule="two-pass")
# warm-up on a toy of the same architecture: lazy imports and one-time kernel set-up happen before the baseline
prune_(LlavaForConditionalGeneration(llava(64, 128, 1, 4)).eval(), prune_config, calibration(1, 16),
       execution=execution, progress=False)
baseline = rss()
config = llava(768, 2048, 4, 12)
torch.manual_seed(0)
model = LlavaForConditionalGeneration(config).eval()
n, text = 8, 192
batches = calibration(n, text)
plan = plan_memory(prune_config, execution, config, n, text + 64, 1, "float32")
prune_(model, prune_config, batches, execution=execution, progress=False)
# VmHWM, this process's own peak: ru_maxrss starts from the parent's peak when spawned by (v)fork + exec
peak = rss("VmHWM") - baseline
print(json.dumps({"peak": peak, "plan": plan.peak(), "parts": plan.to_dict()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_plan_within_25_percent_of_measured_peak_rss():
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               # a fixed glibc mmap threshold: freed tensors leave the RSS, so it tracks live memory
                               "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["plan"] == pytest.approx(result["peak"], rel=0.25), result
