"""Analysis: pure IoU math, t-SNE determinism, collectors on a tiny padded LLaVA, figures and `atv figures`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import IMAGE, build_tiny

from analysis.drift import collect_drift, grid_side, load_drift, overlay_layout, save_drift
from analysis.figures import make_figures
from analysis.masks import (
    collect_pool_masks,
    iou_table,
    load_pool_masks,
    mask_iou,
    pack_mask,
    save_pool_masks,
    split_name,
    unpack_mask,
)
from analysis.sensitivity import method_comparison, sensitivity_curves, write_records
from analysis.tables import method_table, to_latex, to_markdown
from analysis.tsne import collect_hidden_states, save_hidden_states, tsne_embed
from atv.experiments.cells import cell_record
from pruning.errors import CalibrationError, ConfigError, ToolkitError
from pruning.pools import alpha_rule_k

BENCHES = ("vqa", "pope")


@pytest.fixture(scope="module")
def tiny():
    model, inputs = build_tiny("llava", batch=2, padded=True)
    valid = inputs["attention_mask"].bool()
    visual = inputs["input_ids"] == IMAGE
    return model, inputs, valid, visual


def _probe_records():
    dense = {"cell": {"pathway": "dense"}, "scores": {"vqa": 50.0, "pope": 80.0}, "mean_retention": 100.0}
    cells = [("text", "text", 0.5, 98.0), ("text", "visual", 0.5, 94.0), ("text", "text", 0.6, 85.0),
             ("text", "visual", 0.6, 51.0), ("visual", "text", 0.5, 100.2), ("visual", "text", 0.6, 99.9)]
    return [dense] + [{"cell": {"pathway": p, "pool": q, "sparsity": s}, "mean_retention": r,
                       "retention": {b: r for b in BENCHES}, "scores": {b: r / 2 for b in BENCHES}}
                      for p, q, s, r in cells]


def _method_records():
    dense = {"vqa": 50.0, "pope": 80.0}
    records = [cell_record({"method": "dense", "setting": "dense"}, dense, None, None)]
    for setting, drop in (("50%", 0.95), ("2:4", 0.8)):
        for method, factor in (("wanda", 0.98), ("atv", 1.0)):
            scores = {b: v * drop * factor for b, v in dense.items()}
            records.append(cell_record({"method": method, "setting": setting}, scores, None, records[0]))
    return records


# -- pure IoU math ---------------------------------------------------------------------------------
def test_mask_iou_matches_hand_computation():
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # pruned in both: (0,0), (1,0) -> 2; pruned in either: (0,0), (0,1), (0,2), (1,0), (1,3) -> 5
    assert mask_iou(a, b) == pytest.approx(2 / 5)
    assert mask_iou(b, a) == pytest.approx(2 / 5)


def test_mask_iou_self_empty_and_disjoint():
    m = torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    assert mask_iou(m, m) == 1.0
    assert mask_iou(m, ~m) == 0.0
    empty = torch.zeros(3, 4, dtype=torch.bool)
    assert mask_iou(empty, empty) == 1.0
    with pytest.raises(ConfigError, match="same shape"):
        mask_iou(m, m[:, :8])


def test_iou_table_names_layers_and_projections():
    g = torch.Generator().manual_seed(1)
    names = ["model.language_model.layers.1.mlp.down_proj", "model.language_model.layers.0.self_attn.q_proj"]
    a = {n: torch.rand(4, 8, generator=g) < 0.5 for n in names}
    b = {names[0]: a[names[0]], names[1]: ~a[names[1]]}
    rows = iou_table(a, b)
    assert [(r.layer, r.projection, r.iou) for r in rows] == [(0, "q_proj", 0.0), (1, "down_proj", 1.0)]
    assert split_name("layers.12.self_attn.k_proj") == (12, "k_proj")
    with pytest.raises(ConfigError, match="different Linears"):
        iou_table(a, {names[0]: a[names[0]]})
    with pytest.raises(ConfigError):
        iou_table({}, {})


def test_pack_unpack_roundtrip():
    m = torch.rand(5, 13, generator=torch.Generator().manual_seed(2)) < 0.3  # 65 entries: not a multiple of 8
    packed = pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == 9
    assert torch.equal(unpack_mask(packed, m.shape), m)


# -- t-SNE -----------------------------------------------------------------------------------------
def test_tsne_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(0)
    states = {"layers": [3], "states": {3: {"text": torch.randn(30, 16, generator=g),
                                            "visual": torch.randn(40, 16, generator=g) + 3}}}
    first, again = tsne_embed(states, seed=0), tsne_embed(states, seed=0)
    assert first.coords[3].shape == (70, 2)
    np.testing.assert_array_equal(first.coords[3], again.coords[3])
    labels = first.labels[3]
    assert list(labels).count("visual") == 40
    # the two well-separated clouds stay apart in the embedding
    text, visual = first.coords[3][labels == "text"], first.coords[3][labels == "visual"]
    gap = np.linalg.norm(text.mean(0) - visual.mean(0))
    assert gap > 2 * max(text.std(0).max(), visual.std(0).max())


# -- collectors on a tiny padded LLaVA ---------------------------------------------------------------
def test_hidden_states_exclude_padding_and_match_the_model(tiny):
    model, inputs, valid, visual = tiny
    states = collect_hidden_states(model, [inputs], layers=(0, 1), max_per_modality=None)
    assert len(states["states"][1]["text"]) == int((valid & ~visual).sum()) == states["totals"]["text"]
    assert len(states["states"][1]["visual"]) == int((valid & visual).sum()) == 32
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True).hidden_states[1]  # input of decoder layer 1
    torch.testing.assert_close(states["states"][1]["text"], reference[valid & ~visual])
    torch.testing.assert_close(states["states"][1]["visual"], reference[valid & visual])


def test_hidden_states_subsample_is_seeded_and_a_subset(tiny):
    model, inputs, valid, visual = tiny
    full = collect_hidden_states(model, [inputs], layers=(1,), max_per_modality=None)["states"][1]["visual"]
    first = collect_hidden_states(model, [inputs], layers=(1,), max_per_modality=5, seed=3)["states"][1]["visual"]
    again = collect_hidden_states(model, [inputs], layers=(1,), max_per_modality=5, seed=3)["states"][1]["visual"]
    assert first.shape == (5, full.shape[1])
    assert torch.equal(first, again)
    assert all(any(torch.equal(row, f) for f in full) for row in first)
    with pytest.raises(ConfigError, match="out of range"):
        collect_hidden_states(model, [inputs], layers=(2,))
    with pytest.raises(CalibrationError):
        collect_hidden_states(model, [], layers=(0,))


def test_pool_masks_leave_weights_untouched(tiny, tmp_path):
    model, inputs, _, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pool_masks = collect_pool_masks(model, [inputs], pools=("text", "visual"), sparsity=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    masks = pool_masks["masks"]
    assert len(masks["text"]) == 14  # 2 layers x 7 projections
    for mask in masks["text"].values():
        assert mask.dtype == torch.bool and mask.float().mean() == 0.5
    loaded = load_pool_masks(save_pool_masks(pool_masks, tmp_path / "pool_masks.pt"))
    assert all(torch.equal(loaded["masks"]["visual"][n], m) for n, m in masks["visual"].items())
    with pytest.raises(ConfigError, match="unknown pool"):
        collect_pool_masks(model, [inputs], pools=("text", "mixedd"))


def test_drift_k_follows_the_alpha_rule_without_padding(tiny):
    model, inputs, valid, visual = tiny
    data = collect_drift(model, [inputs], alpha=1.0)
    n_text = (valid & ~visual).sum(1).tolist()
    assert data["n_text"] == n_text and n_text[0] != n_text[1]  # the padded row has fewer text tokens
    assert data["n_visual"] == [16, 16]
    for i in data["layers"]:
        values = torch.cat(data["drift"][i])
        assert data["mean_drift"][i] == pytest.approx(float(values.mean()))
        for b in range(2):
            k = alpha_rule_k(n_text[b], 16, data["mean_drift"][i], 1.0)
            assert data["k"][i][b] == k and int(data["selected"][i][b].sum()) == k
            chosen = data["drift"][i][b][data["selected"][i][b]]
            rest = data["drift"][i][b][~data["selected"][i][b]]
            assert k == 0 or chosen.min() >= rest.max()  # the top-k drifting visual tokens


def test_overlay_layout_needs_an_image_and_a_square_grid():
    assert grid_side(576) == 24 and grid_side(16) == 4 and grid_side(15) is None and grid_side(0) is None
    data = {"n_visual": [15], "image": torch.zeros(4, 4, 3, dtype=torch.uint8), "image_sample": 0}
    side, reason = overlay_layout(data)
    assert side is None and "square grid" in reason
    side, reason = overlay_layout({"n_visual": [16], "image": None})
    assert side is None and "no input image" in reason


# -- records, tables, errors ------------------------------------------------------------------------
def test_sensitivity_and_method_data():
    curves = sensitivity_curves(_probe_records()).curves
    assert curves[("text", "visual")] == [(50.0, 94.0), (60.0, 51.0)]
    comparison = method_comparison(_method_records(), "retention")
    assert comparison.settings == ["50%", "2:4"] and comparison.methods == ["wanda", "atv"]
    assert comparison.values["2:4"]["atv"]["vqa"] == pytest.approx(80.0)
    assert comparison.values["50%"]["wanda"]["mean"] == pytest.approx(95.0 * 0.98)
    assert method_comparison(_method_records(), "scores").dense["pope"] == 80.0
    header, rows = method_table(_method_records())
    assert header == ["method", "50%", "2:4"]
    assert rows == [["wanda", "93.10", "78.40"], ["atv", "95.00", "80.00"]]


def test_bad_records_raise():
    with pytest.raises(ConfigError, match="no pruned probe cell"):
        sensitivity_curves([])
    with pytest.raises(ConfigError, match="no pruned probe cell"):
        sensitivity_curves(_probe_records()[:1])
    with pytest.raises(ConfigError, match="record 0"):
        sensitivity_curves([{"cell": {"pathway": "text", "pool": "text"}, "mean_retention": 90.0}])
    with pytest.raises(ConfigError, match="no pruned method record"):
        method_comparison([])
    with pytest.raises(ConfigError, match="value must be"):
        method_comparison(_method_records(), "accuracy")
    with pytest.raises(ToolkitError, match="retention is undefined"):
        cell_record({"method": "atv", "setting": "50%"}, {"vqa": 1.0}, None, {"scores": {"vqa": 0.0}})


# -- make_figures and the CLI ------------------------------------------------------------------------
def _nonempty(paths):
    return all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_make_figures_with_only_probe_records(tmp_path):
    write_records(_probe_records(), tmp_path / "results" / "probe" / "results.jsonl")
    report = make_figures(tmp_path / "results", tmp_path / "figs")
    assert sorted(p.name for p in report.made) == ["sensitivity.pdf", "sensitivity.png"]
    assert _nonempty(report.made) and _nonempty(report.tables)
    assert sorted(p.name for p in report.tables) == ["probe_table.csv", "probe_table.md", "probe_table.tex"]
    assert set(report.skipped) == {"methods_retention", "methods_scores", "method_table", "tsne", "mask_iou",
                                   "drift", "drift_patches", "sensitivity_map", "map_table", "map_top1"}
    assert all("not found" in reason for reason in report.skipped.values())
    assert "hidden_states.pt" in report.skipped["tsne"]


def test_make_figures_everything(tiny, tmp_path):
    model, inputs, _, _ = tiny
    results = tmp_path / "results"
    write_records(_probe_records(), results / "probe" / "results.jsonl")
    write_records(_method_records(), results / "methods" / "results.jsonl")
    save_hidden_states(collect_hidden_states(model, [inputs], layers=(0, 1)), results / "analysis/hidden_states.pt")
    save_pool_masks(collect_pool_masks(model, [inputs]), results / "analysis/pool_masks.pt")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    save_drift(collect_drift(model, [inputs]), results / "analysis/drift.pt", image=image, image_sample=1)
    assert load_drift(results / "analysis/drift.pt")["image"].shape == (32, 32, 3)
    map_records = [{"cell": {"pathway": "dense"}, "kl": 0.0, "top1": 100.0}] + [
        {"cell": {"layer": i, "pathway": p, "group": g, "sparsity": 0.7}, "kl": 0.01 * (i + 1), "top1": 90.0 - i}
        for i in range(2) for p in ("text", "visual") for g in ("attn", "ffn")]
    write_records(map_records, results / "map" / "results.jsonl")
    report = make_figures(results, tmp_path / "figs", formats=("png",))
    assert report.skipped == {}
    assert sorted(p.stem for p in report.made) == sorted(
        ["sensitivity", "methods_retention", "methods_scores", "tsne", "mask_iou", "drift", "drift_patches",
         "sensitivity_map"])
    assert _nonempty(report.made) and len(report.tables) == 12


def test_make_figures_bad_input(tmp_path):
    with pytest.raises(ToolkitError, match="does not exist"):
        make_figures(tmp_path / "missing", tmp_path / "figs")
    (tmp_path / "results").mkdir()
    with pytest.raises(ConfigError, match="formats"):
        make_figures(tmp_path / "results", tmp_path / "figs", formats=("gif",))
    # records that hold only the dense cell: the figure is skipped with the reason, not a crash
    write_records(_probe_records()[:1], tmp_path / "results" / "probe" / "results.jsonl")
    report = make_figures(tmp_path / "results", tmp_path / "figs")
    assert report.made == [] and "no pruned probe cell" in report.skipped["sensitivity"]


def test_cli_figures(tmp_path, capsys):
    from atv.cli import main

    write_records(_method_records(), tmp_path / "methods" / "results.jsonl")
    assert main(["figures", "--results", str(tmp_path), "--out", str(tmp_path / "figs"), "--formats", "png"]) == 0
    out = capsys.readouterr().out
    assert "methods_retention.png" in out and "skipped tsne" in out
    assert (tmp_path / "figs" / "methods_retention.png").stat().st_size > 0


def test_palette_is_seaborn_colorblind():
    import seaborn as sns

    from analysis.style import PALETTE

    assert list(PALETTE) == sns.color_palette("colorblind").as_hex()


def test_tables_right_align_exactly_the_numeric_columns():
    table = (["method", "50%", "2:4", "note"], [["atv", "48.47", "–", "ok"], ["wanda", "40.78", "41.29", "x"]])
    assert to_markdown(table).splitlines()[1] == "|---|---:|---:|---|"
    assert r"\begin{tabular}{lrrl}" in to_latex(table)


def test_saved_figures_are_byte_identical_across_runs(tmp_path):
    import time

    import matplotlib.pyplot as plt

    from analysis.style import save_figure

    contents = []
    for run in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        paths = save_figure(fig, tmp_path / run / "line", formats=("png", "pdf"))
        plt.close(fig)
        contents.append([p.read_bytes() for p in paths])
        time.sleep(1.1)  # a creation date, if written, would now differ
    assert contents[0] == contents[1]
