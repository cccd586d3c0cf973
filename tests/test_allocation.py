"""Non-uniform sparsity at the same global budget (pruning.allocation): OWL's per-layer ratios against a hand
computation from the model's own forward, the global budget within one weight per Linear for owl and map with
every method, exact per-Linear counts, and refusals."""

import json
import math

import pytest
import torch
from tiny_models import _config, build_tiny
from torch import nn

from pruning import PruneConfig, prune_
from pruning.allocation import (
    MAP_FILE,
    SensitivityMap,
    match_budget,
    outlier_ratio,
    projection_group,
    prune_counts,
    spread,
)
from pruning.errors import ConfigError
from pruning.masks import count_mask, row_mask
from pruning.sparsegpt import sparsegpt_prune

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _deep_llava(layers=4, seed=0):
    """The tiny LLaVA with ``layers`` decoder layers (random weights from ``seed``)."""
    import transformers as tf

    config = _config("llava")
    config.text_config.num_hidden_layers = layers
    torch.manual_seed(seed)
    return tf.AutoModelForImageTextToText.from_config(config).eval()


@pytest.fixture(scope="module")
def batches():
    return [build_tiny("llava", seed=s, batch=2, padded=True)[1] for s in (1, 2)]


def _decoder_linears(model):
    """Per decoder layer: projection leaf name -> Linear (found by walking the language model's layers)."""
    layers = model.model.language_model.layers
    return [{n.rpartition(".")[2]: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)} for layer in layers]


def _pruned_count(model):
    linears = [lin for layer in _decoder_linears(model) for lin in layer.values()]
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears)
    return zeros, sum(lin.weight.numel() for lin in linears), len(linears)


# -- pure functions --------------------------------------------------------------------------------------
def test_spread_is_owls_linear_rule_by_hand():
    # D = (0.1, 0.2, 0.4), lambda 0.1: D' = (0, 1/15, 0.2), mean 4/45; S_l = 0.5 - (D' - mean)
    got = spread([0.1, 0.2, 0.4], 0.5, 0.1)
    assert got == pytest.approx([0.5 + 4 / 45, 0.5 - 1 / 15 + 4 / 45, 0.5 - 0.2 + 4 / 45])
    assert sum(got) / 3 == pytest.approx(0.5)
    assert spread([3.0, 3.0], 0.6, 0.08) == [0.6, 0.6]


def test_budget_shift_and_counts_meet_the_weighted_target():
    sizes = [100, 300, 37]
    shifted = match_budget([0.4, 0.6, 0.5], sizes, 0.5)
    # the unweighted spread had a weighted mean of (40 + 180 + 18.5) / 437; one shift c fixes it
    c = 0.5 - (40 + 180 + 18.5) / 437
    assert shifted == pytest.approx([0.4 + c, 0.6 + c, 0.5 + c])
    counts = prune_counts(shifted, sizes, 0.5)
    assert sum(counts) == round(0.5 * 437)
    assert all(abs(n - s * size) < 1 for n, s, size in zip(counts, shifted, sizes))


def test_outlier_ratio_by_hand():
    a = torch.tensor([[1.0, 1.0], [1.0, 20.0]])  # mean over both: (23 + 3 + 9) / 8 = 4.375; > 2 x mean = 8.75
    b = torch.tensor([[1.0, 1.0], [1.0, 9.0]])
    assert outlier_ratio([a, b], 2.0) == pytest.approx(2 / 8)
    assert outlier_ratio([a, b], 5.0) == pytest.approx(0.0)


def test_projection_groups():
    assert [projection_group(n) for n in ("self_attn.q_proj", "self_attn.o_proj", "linear_attn.out_proj",
                                          "mlp.up_proj", "mlp.experts.down_proj[3]", "feed_forward.w1",
                                          "block_sparse_moe.experts.0.w2")] == \
        ["attn", "attn", "attn", "ffn", "ffn", "ffn", "ffn"]


def test_count_mask_prunes_exact_counts_and_is_the_row_mask_on_multiples_of_the_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 10, generator=g)
    assert torch.equal(count_mask(scores, 6 * 4), row_mask(scores, 0.4))
    mask = count_mask(scores, 6 * 4 + 2)
    assert int(mask.sum()) == 26
    per_row = mask.sum(dim=1)
    assert sorted(per_row.tolist()) == [4, 4, 4, 4, 5, 5]
    # the two extra weights go to the rows whose 5th-lowest score is smallest
    fifth = scores.sort(dim=1).values[:, 4]
    assert set(per_row.eq(5).nonzero().squeeze(1).tolist()) == set(fifth.argsort()[:2].tolist())
    # within a row the lowest scores are pruned
    for r in range(6):
        assert scores[r][mask[r]].max() < scores[r][~mask[r]].min()
    with pytest.raises(ValueError, match="count must be in"):
        count_mask(scores, 61)


def test_sparsegpt_count_equals_its_sparsity_when_blocks_divide():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g)
    x = torch.randn(64, 32, generator=g)
    h = 2 * x.T @ x / 64
    by_sparsity = sparsegpt_prune(w, h, 0.5, blocksize=8)
    by_count = sparsegpt_prune(w, h, 0.5, blocksize=8, count=128)
    assert torch.equal(by_sparsity[1], by_count[1]) and torch.equal(by_sparsity[0], by_count[0])
    assert int(sparsegpt_prune(w, h, 0.5, blocksize=8, count=101)[1].sum()) == 101


# -- OWL on a model --------------------------------------------------------------------------------------
def _hand_outlier_ratios(model, batches, m):
    """D_l from the model's own forward: hooks on every decoder Linear collect its inputs at non-padding tokens;
    Wanda scores |W| * sqrt(sum x^2); share of the layer's scores above m x their mean."""
    layers = _decoder_linears(model)
    sums = [{name: 0.0 for name in layer} for layer in layers]
    handles = []
    mask_now = {}
    for i, layer in enumerate(layers):
        for name, lin in layer.items():
            def hook(_m, args, i=i, name=name):
                x = args[0][mask_now["valid"]]
                sums[i][name] = sums[i][name] + x.double().pow(2).sum(0)
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for inputs in batches:
            mask_now["valid"] = inputs["attention_mask"].bool()
            model(**inputs)
    for h in handles:
        h.remove()
    ratios = []
    for i, layer in enumerate(layers):
        scores = torch.cat([(lin.weight.double().abs() * sums[i][n].sqrt()).flatten() for n, lin in layer.items()])
        ratios.append(float((scores > m * scores.mean()).double().mean()))
    return ratios


def test_owl_ratios_and_layer_sparsities_match_a_hand_computation(batches):
    model = _deep_llava(4)
    m, lam, target = 3.0, 0.05, 0.45
    ratios = _hand_outlier_ratios(model, batches, m)
    assert len(set(ratios)) > 1  # the layers differ, so the spread is not trivial
    lo, hi = min(ratios), max(ratios)
    scaled = [(d - lo) / (hi - lo) * 2 * lam for d in ratios]
    expected = [target - (d - sum(scaled) / 4) for d in scaled]  # equal-size layers: no budget shift

    report = prune_(model, PruneConfig("wanda", sparsity=target, allocation="owl", owl_m=m, allocation_lambda=lam),
                    batches, progress=False)
    units = report.allocation["units"]
    assert [u["value"] for u in units] == pytest.approx(ratios, abs=1e-12)
    assert [u["sparsity"] for u in units] == pytest.approx(expected, abs=1e-12)
    for layer, want in zip(_decoder_linears(model), expected):
        zeros = sum(int((lin.weight == 0).sum()) for lin in layer.values())
        total = sum(lin.weight.numel() for lin in layer.values())
        assert abs(zeros - want * total) <= len(layer)
    pruned, total, n_linears = _pruned_count(model)
    assert abs(pruned - target * total) <= 1 <= n_linears


@pytest.mark.parametrize("method, pool", [("wanda", None), ("atv", None), ("sparsegpt", None), ("magnitude", None),
                                          ("tamp", None), ("sparsegpt", "atv"), ("wanda", "text")])
def test_owl_keeps_the_global_budget_with_every_method(batches, method, pool):
    model = _deep_llava(4, seed=3)
    target = 0.37
    report = prune_(model, PruneConfig(method, sparsity=target, pool=pool, allocation="owl", allocation_lambda=0.1),
                    batches, progress=False)
    pruned, total, n_linears = _pruned_count(model)
    assert abs(pruned - target * total) <= n_linears  # the bound; in fact within one weight:
    assert abs(pruned - round(target * total)) == 0
    assert len({round(u["sparsity"], 9) for u in report.allocation["units"]}) > 1


def test_uniform_allocation_is_todays_masks(batches):
    a, b = _deep_llava(2), _deep_llava(2)
    prune_(a, PruneConfig("atv", sparsity=0.5), batches, progress=False)
    prune_(b, PruneConfig("atv", sparsity=0.5, allocation="uniform"), batches, progress=False)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


# -- map allocation --------------------------------------------------------------------------------------
def _write_map(folder, kl, num_layers=2):
    smap = SensitivityMap(num_layers, 0.7, kl)
    (folder / MAP_FILE).write_text(smap.to_json(), encoding="utf-8")
    return folder / MAP_FILE


def test_map_allocation_by_hand_and_budget(batches, tmp_path):
    kl = {(0, "text", "attn"): 0.02, (0, "visual", "attn"): 0.01, (0, "text", "ffn"): 0.5, (0, "visual", "ffn"): 0.1,
          (1, "text", "attn"): 0.002, (1, "visual", "attn"): 0.0, (1, "text", "ffn"): 0.05, (1, "visual", "ffn"): 0.01}
    _write_map(tmp_path, kl)
    model = _deep_llava(2, seed=5)
    lam, target = 0.1, 0.5
    report = prune_(model, PruneConfig("wanda", sparsity=target, allocation="map", allocation_map=str(tmp_path),
                                       allocation_lambda=lam), batches, progress=False)
    # by hand: per (layer, group) the KL summed over paths, its log, OWL's rule, then one shift for the sizes
    keys = [(0, "attn"), (0, "ffn"), (1, "attn"), (1, "ffn")]
    values = [math.log(kl[(i, "text", g)] + kl[(i, "visual", g)] + 1e-6) for i, g in keys]
    lo, hi = min(values), max(values)
    scaled = [(v - lo) / (hi - lo) * 2 * lam for v in values]
    s = [target - (d - sum(scaled) / 4) for d in scaled]
    hidden, inter = 64, 128
    kv = model.config.text_config.num_key_value_heads * (hidden // model.config.text_config.num_attention_heads)
    attn_size, ffn_size = 2 * hidden * hidden + 2 * hidden * kv, 3 * hidden * inter
    sizes = [attn_size, ffn_size, attn_size, ffn_size]
    c = target - sum(x * n for x, n in zip(s, sizes)) / sum(sizes)
    expected = [x + c for x in s]
    assert [(u["layer"], u["group"]) for u in report.allocation["units"]] == keys
    assert [u["sparsity"] for u in report.allocation["units"]] == pytest.approx(expected, abs=1e-12)
    assert expected[1] < expected[0] and expected[3] < expected[2]  # the FFNs are the sensitive groups here
    layers = _decoder_linears(model)
    for (i, group), want in zip(keys, expected):
        names = ("q_proj", "k_proj", "v_proj", "o_proj") if group == "attn" else ("gate_proj", "up_proj", "down_proj")
        zeros = sum(int((layers[i][n].weight == 0).sum()) for n in names)
        assert abs(zeros - want * sum(layers[i][n].weight.numel() for n in names)) <= len(names)
    pruned, total, n_linears = _pruned_count(model)
    assert abs(pruned - target * total) <= 1 <= n_linears


@pytest.mark.parametrize("method", ["atv", "sparsegpt", "magnitude"])
def test_map_keeps_the_global_budget_with_other_methods(batches, tmp_path, method):
    kl = {(i, p, g): 0.01 * (1 + i) * (3 if g == "ffn" else 1) for i in range(2) for p in ("text", "visual")
          for g in ("attn", "ffn")}
    _write_map(tmp_path, kl)
    model = _deep_llava(2, seed=6)
    prune_(model, PruneConfig(method, sparsity=0.6, allocation="map", allocation_map=str(tmp_path / MAP_FILE)),
           batches if method != "magnitude" else (), progress=False)
    pruned, total, _ = _pruned_count(model)
    assert abs(pruned - round(0.6 * total)) == 0


def test_map_refusals(batches, tmp_path):
    model = _deep_llava(2)
    with pytest.raises(ConfigError, match="cannot read the sensitivity map"):
        prune_(model, PruneConfig("wanda", allocation="map", allocation_map=str(tmp_path / "none.json")), batches,
               progress=False)
    _write_map(tmp_path, {(0, "text", "attn"): 0.1}, num_layers=3)
    with pytest.raises(ConfigError, match="3 decoder layers, this one has 2"):
        prune_(model, PruneConfig("wanda", allocation="map", allocation_map=str(tmp_path)), batches, progress=False)
    _write_map(tmp_path, {(0, "text", "attn"): 0.1, (0, "text", "ffn"): 0.2}, num_layers=2)
    with pytest.raises(ConfigError, match=r"no value for \(layer, group\) \[\(1, 'attn'\), \(1, 'ffn'\)\]"):
        prune_(model, PruneConfig("wanda", allocation="map", allocation_map=str(tmp_path)), batches, progress=False)
    (tmp_path / "other.json").write_text(json.dumps({"cells": []}))
    with pytest.raises(ConfigError, match="is not a sensitivity map"):
        prune_(model, PruneConfig("wanda", allocation="map", allocation_map=str(tmp_path / "other.json")), batches,
               progress=False)
    # nothing was pruned by the refused runs
    assert _pruned_count(model)[0] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(allocation="owl", pattern="2:4"), "cannot be combined with pattern 2:4"),
    (dict(allocation="map"), "allocation 'map' needs allocation_map"),
    (dict(allocation="owl", allocation_map="m.json"), "needs allocation_map"),
    (dict(allocation="layerwise"), "allocation must be one of"),
    (dict(allocation="owl", allocation_lambda=0.6), r"allocation_lambda must be in \[0, 0.5\), got 0.6"),
    (dict(allocation="owl", owl_m=0.0), "owl_m must be > 0, got 0.0"),
])
def test_config_refuses_bad_allocations(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig("wanda", **kwargs)


def test_a_sparsity_pushed_out_of_range_is_refused(batches):
    model = _deep_llava(4)
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        prune_(model, PruneConfig("wanda", sparsity=0.95, allocation="owl", allocation_lambda=0.2, owl_m=3.0),
               batches, progress=False)
    assert _pruned_count(model)[0] == 0


def test_owl_needs_calibration_even_for_magnitude():
    assert PruneConfig("magnitude", allocation="owl").needs_calibration
    assert not PruneConfig("magnitude").needs_calibration


def test_cli_prunes_with_owl_and_reports_the_allocation(tmp_path, capsys):
    from tiny_processors import save_model_dir, write_calibration

    from atv.cli import main

    model, _ = build_tiny("llava")
    model_dir = save_model_dir("llava", model, tmp_path / "dense")
    calib, images = write_calibration(tmp_path / "calib", n=3)
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.45", "--out", str(out)]
    assert main([*args, "--allocation", "owl"]) == 2
    assert "allocation 'owl' needs --calib and --images" in capsys.readouterr().err
    assert main([*args, "--allocation", "owl", "--allocation-lambda", "0.05", "--calib", str(calib), "--images",
                 str(images), "--nsamples", "3"]) == 0, capsys.readouterr().err
    report = json.loads((out / "prune_report.json").read_text())
    assert report["allocation"]["kind"] == "owl" and len(report["allocation"]["units"]) == 2
    assert sorted(u["sparsity"] for u in report["allocation"]["units"]) == pytest.approx([0.4, 0.5])
    card = (out / "README.md").read_text()
    assert "0.45 global, allocated by `owl` (lambda 0.05; per unit 0.4000 to 0.5000" in card
    assert "allocation: owl" in (out / "recipe.yaml").read_text()
