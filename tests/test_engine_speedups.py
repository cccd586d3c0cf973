"""The engine's fast paths give exactly what the plain implementation gives: per-row masks by selection
vs a stable sort, shared statistics for Linears with one input vs one accumulator each, masks equal to a
saved reference of the engine before these changes, and fp32 statistics for a model running in bf16."""

import hashlib

import pytest
import torch
from tiny_models import build_tiny

from pruning import engine, masks
from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks
from pruning.masks import row_mask, row_mask_by_sort
from pruning.scores import STATS_DTYPE, wanda_scores


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.6, 0.99])
def test_row_mask_by_selection_equals_the_stable_sort(sparsity):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(37, 64, generator=g)
    cases = {
        "random": scores,
        "ties": (scores * 4).round(),          # many equal values: ties go to the lower column
        "constant": torch.ones(5, 64),
        "zeros_and_ones": (torch.arange(64) % 3 == 0).float().expand(6, 64).contiguous(),
        "signed_zero": torch.tensor([[0.0, -0.0, 1.0, 0.0, -0.0, 2.0, 0.0, 3.0]]),
        "inf": torch.tensor([[float("inf"), 1.0, float("inf"), 0.5, 2.0, 0.0, 1.0, 1.0]]),
    }
    for name, s in cases.items():
        assert torch.equal(row_mask(s, sparsity), row_mask_by_sort(s, sparsity)), name


def test_row_mask_with_nan_falls_back_to_the_sort():
    s = torch.tensor([[0.3, float("nan"), 0.1, 0.2], [float("nan")] * 4])
    assert torch.equal(row_mask(s, 0.5), row_mask_by_sort(s, 0.5))


def _plain(monkeypatch):
    """The engine without its fast paths: the sort-based mask and one accumulator per Linear."""
    monkeypatch.setattr(masks, "row_mask", row_mask_by_sort)
    monkeypatch.setattr(engine.LayerPruner, "_accumulators", _one_per_linear)


def _one_per_linear(self, acts):
    from pruning.stats import Hessian, SquaredNorms

    kind = Hessian if self.config.scorer == "sparsegpt" else SquaredNorms
    return {n: kind(lin.in_features, device=self.device) for n, lin in self.linears.items()}


def _calibration(family):
    return [build_tiny(family, seed=s, batch=2, padded=True)[1] for s in range(2)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("config", [PruneConfig("wanda"), PruneConfig("atv", sparsity=0.6),
                                    PruneConfig("sparsegpt", pool="atv"), PruneConfig("atv", pattern="2:4")])
def test_fast_paths_equal_the_plain_engine(monkeypatch, family, config):
    model, _ = build_tiny(family, seed=0)
    batches = _calibration(family)
    fast = compute_masks(model, config, batches, progress=False).masks
    with monkeypatch.context() as patch:
        _plain(patch)
        plain = compute_masks(model, config, batches, progress=False).masks
    assert fast.keys() == plain.keys()
    assert all(torch.equal(fast[k], plain[k]) for k in plain)


@pytest.mark.parametrize("options, dense_pass_runs_it", [
    (dict(method="wanda"), False), (dict(method="sparsegpt"), False), (dict(method="wanda", propagate="dense"), True),
    (dict(method="atv"), True), (dict(method="tamp"), True)])
def test_a_dense_pass_ends_at_the_last_input_unless_its_output_or_attention_is_needed(options, dense_pass_runs_it):
    """Layer 0's down_proj (the last projection) runs in the propagation of each batch; in the dense pass only when
    the pass's output is kept (propagate='dense'), drift is measured (ATV) or attention is recorded (TAMP)."""
    model, _ = build_tiny("llava", seed=0)
    batches = _calibration("llava")
    down = get_adapter(model).named_linears(model, 0)["mlp.down_proj"]
    runs = []
    handle = down.register_forward_hook(lambda *_: runs.append(1))
    try:
        compute_masks(model, PruneConfig(**options, layers=(0,)), batches, progress=False)
    finally:
        handle.remove()
    propagated = 0 if options.get("propagate") == "dense" else len(batches)
    assert len(runs) == propagated + (len(batches) if dense_pass_runs_it else 0)


# sha256 (first 16 hex digits) over (name, mask bytes) in name order, computed with the engine of commit
# 00b9768 (before the fast paths) on build_tiny(family, seed=0) and two padded batches of 2 (seeds 0, 1).
REFERENCE = {
    ("llava", "wanda", None, None): "dd30eac17101403a",
    ("llava", "atv", None, None): "f9e85c84b23afa71",
    ("llava", "magnitude", None, None): "9e1ce5ff46978d28",
    ("llava", "sparsegpt", None, None): "aba95c2dbb781292",
    ("llava", "atv", None, "2:4"): "dfaa897f0b0de725",
    ("qwen2_vl", "atv", 0.6, None): "c173a07db23390e0",
    ("qwen2_vl", "tamp", None, None): "6a67f189f73d0102",
}


def _digest(masks):
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("case", list(REFERENCE))
def test_masks_equal_the_saved_reference_of_the_engine_before_the_fast_paths(case):
    family, method, sparsity, pattern = case
    model, _ = build_tiny(family, seed=0)
    report = compute_masks(model, PruneConfig(method, sparsity=sparsity, pattern=pattern), _calibration(family),
                           progress=False)
    assert _digest(report.masks) == REFERENCE[case]


def test_bf16_model_gets_fp32_statistics_of_its_own_bf16_activations():
    """Prune a bf16 model; the layer-0 q_proj mask equals the Wanda mask from fp32 sums of the very bf16
    inputs the model's forward feeds q_proj (padding and visual tokens excluded by the text pool)."""
    model, _ = build_tiny("llava", seed=0, dtype=torch.bfloat16)
    batches = [build_tiny("llava", seed=s, batch=2, padded=True, dtype=torch.bfloat16)[1] for s in range(2)]
    adapter = get_adapter(model)
    q_proj = adapter.named_linears(model, 0)["self_attn.q_proj"]
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            for inputs in batches:
                model(**inputs, use_cache=False)
    finally:
        handle.remove()
    total, samples = torch.zeros(q_proj.in_features, dtype=STATS_DTYPE), 0
    for x, inputs in zip(seen, batches):
        assert x.dtype == torch.bfloat16
        text = inputs["attention_mask"].bool() & ~adapter.visual_mask(model, inputs["input_ids"])
        total += x[text].to(STATS_DTYPE).pow(2).sum(dim=0)
        samples += x.shape[0]
    expected = row_mask(wanda_scores(q_proj.weight, total / samples), 0.5)
    report = compute_masks(model, PruneConfig("wanda", pool="text", layers=(0,), targets=("self_attn.q_proj",)),
                           batches, progress=False)
    (mask,) = report.masks.values()
    assert torch.equal(mask, expected)
    assert next(model.parameters()).dtype == torch.bfloat16
