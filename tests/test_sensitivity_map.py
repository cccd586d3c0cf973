"""The sensitivity map (atv probe --map): cells, the dense-referenced KL / top-1 metric against a direct
computation, resume, tables, the map file driving allocation='map', the heat map, and the CLI's refusals."""


import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny
from tiny_studies import in_memory_study

from analysis.figures import make_figures
from analysis.sensitivity_map import COLUMNS, map_table
from atv.cli import main
from atv.experiments.records import RESULTS, read_records
from atv.experiments.sensitivity_map import MapConfig, pathway_contrast, run_map_study
from evaluation import load_benchmark
from evaluation.intervals import Bootstrap, mean_interval, score_interval
from evaluation.model_io import build_prompt, encode
from evaluation.prompt_fidelity import (
    answer_prompts,
    prompt_fidelity,
    prompt_reference,
    prompt_states,
    replayed_fidelity,
)
from mot_probe.surgery import attach_probe_
from pruning import PruneConfig, compute_masks, prune_
from pruning.adapters import LlavaAdapter
from pruning.allocation import read_sensitivity_map
from pruning.errors import ConfigError, ToolkitError, UnsupportedModelError


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return in_memory_study(tmp_path_factory.mktemp("bench"), ("the cat is red",))


def _run(setup, out, **kwargs):
    model, processor, calibration, benches = setup
    config = MapConfig(map_items=3, batch_size=2)
    return run_map_study(model, processor, calibration, benches, out, config, progress=False, **kwargs)


@pytest.fixture(scope="module")
def full(setup, tmp_path_factory):
    return _run(setup, tmp_path_factory.mktemp("map"))


def test_cells_dense_kl_is_zero_and_pruned_cells_are_not(full):
    assert full.computed == 9 and full.num_layers == 2  # dense + 2 layers x 2 pathways x 2 groups
    dense, cells = full.records[0], full.records[1:]
    assert dense["cell"] == {"pathway": "dense"}
    assert dense["kl"] == 0.0 and dense["top1"] == 100.0 and len(dense["kl_items"]) == 3
    assert [(r["cell"]["layer"], r["cell"]["pathway"], r["cell"]["group"]) for r in cells] == \
        [(i, p, g) for i in range(2) for p in ("text", "visual") for g in ("attn", "ffn")]
    assert all(r["cell"]["sparsity"] == 0.7 and r["kl"] > 0 for r in cells)
    assert all(r["kl"] == pytest.approx(np.mean(r["kl_items"]), abs=1e-6) for r in cells)
    # only the named layer's group of the named path was pruned: 70% of its weights, per row
    assert all(r["prune"]["mean_sparsity"] == pytest.approx(0.7, abs=0.02) for r in cells)


def test_a_cells_kl_and_top1_match_a_direct_computation(setup, full):
    model, processor, calibration, benches = setup
    record = next(r for r in full.records[1:] if r["cell"] == {"layer": 1, "pathway": "visual", "group": "ffn",
                                                                "sparsity": 0.7})
    bench = load_benchmark(benches[0])
    items = {f"look/{i.id}": i for i in bench.items}
    prompts = [items[p] for p in full.records[0]["prompts"]]
    texts = [build_prompt(processor, i.question, True) + i.answer for i in prompts]
    images = [Image.open(i.image).convert("RGB") for i in prompts]
    kls, agree = [], []
    probe = attach_probe_(model)
    try:
        with torch.no_grad():
            for text, image in zip(texts, images):
                inputs = encode(processor, [text], [image], "right")
                dense = torch.log_softmax(model(**inputs).logits[0].float(), -1)
                probe.prune_path_("visual", PruneConfig("wanda", sparsity=0.7, pool="all", layers=(1,),
                                                        targets=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
                                  calibration, progress=False)
                pruned = torch.log_softmax(model(**inputs).logits[0].float(), -1)
                probe.reset_()
                ids = inputs["input_ids"][0]
                keep = ids[1:] != model.config.image_token_id  # positions predicting a text token
                p, q = dense[:-1][keep], pruned[:-1][keep]
                kls.append(float((p.exp() * (p - q)).sum(-1).mean()))  # the tiny vocabulary is under top-128
                agree.append(100 * float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    finally:
        probe.unload()
    assert record["kl_items"] == pytest.approx(kls, rel=1e-4, abs=1e-6)
    assert record["top1_items"] == pytest.approx(agree, abs=1e-4)


def test_the_map_resumes_and_a_second_run_computes_nothing(setup, full, tmp_path):
    seen = []

    def stop_after_four(record):
        seen.append(record)
        if len(seen) == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(setup, tmp_path / "cut", on_cell=stop_after_four)
    resumed = _run(setup, tmp_path / "cut")
    assert resumed.computed == 5
    assert [r["kl_items"] for r in resumed.records] == [r["kl_items"] for r in full.records]
    again = _run(setup, tmp_path / "cut")
    assert again.computed == 0 and len(read_records(tmp_path / "cut" / RESULTS)) == 9
    assert (tmp_path / "cut" / "map_table.md").read_text() == (full.out_dir / "map_table.md").read_text()


def test_a_different_map_setup_in_the_same_folder_is_refused(setup, full):
    model, processor, calibration, benches = setup
    with pytest.raises(Exception, match="different setup"):
        run_map_study(model, processor, calibration, benches, full.out_dir, MapConfig(map_items=3, batch_size=2,
                                                                                       map_sparsity=0.5),
                      progress=False)


def test_table_layout_and_the_map_file(full):
    header, rows = full.table
    assert header == ["layer", *COLUMNS] == ["layer", "text-attn", "text-ffn", "visual-attn", "visual-ffn"]
    assert [row[0] for row in rows] == ["0", "1"]
    by_cell = {(r["cell"]["layer"], r["cell"]["pathway"], r["cell"]["group"]): r for r in full.records[1:]}
    cell = by_cell[(1, "text", "ffn")]
    low, high = cell["intervals"]["kl"]
    assert rows[1][2] == f"{cell['kl']:.4g} [{low:.3g}, {high:.3g}]" and low <= cell["kl"] <= high
    cell = by_cell[(0, "visual", "attn")]
    low, high = cell["intervals"]["top1"]
    assert map_table(full.records, "top1")[1][0][3] == f"{cell['top1']:.2f} [{low:.2f}, {high:.2f}]"
    old = [{k: v for k, v in r.items() if k != "intervals"} for r in full.records]  # written before intervals
    assert map_table(old, "kl")[1][1][2] == f"{by_cell[(1, 'text', 'ffn')]['kl']:.4g}"
    smap = read_sensitivity_map(full.out_dir)
    assert smap.num_layers == 2 and smap.sparsity == 0.7
    assert smap.kl == {key: r["kl"] for key, r in by_cell.items()}


def test_cell_intervals_resample_the_stored_prompt_values(full):
    for record in full.records:
        boot = Bootstrap(**record["bootstrap"])
        assert boot == Bootstrap(seed=0)
        for metric in ("kl", "top1"):
            want = mean_interval(record[f"{metric}_items"], f"map {metric}", boot).to_list()
            assert record["intervals"][metric] == want
    dense = full.records[0]
    assert dense["intervals"] == {"kl": [0.0, 0.0], "top1": [100.0, 100.0]}  # every prompt agrees with itself


def test_the_map_drives_the_map_allocation_at_the_same_budget(setup, full):
    _, _, calibration, _ = setup
    model, _ = build_tiny("llava", seed=0)
    report = prune_(model, PruneConfig("atv", sparsity=0.5, allocation="map", allocation_map=str(full.map_path)),
                    calibration, progress=False)
    sensitivity = read_sensitivity_map(full.map_path).group_sensitivity()
    units = report.allocation["units"]
    most = max(units, key=lambda u: sensitivity[(u["layer"], u["group"])])
    least = min(units, key=lambda u: sensitivity[(u["layer"], u["group"])])
    assert most["sparsity"] < 0.5 < least["sparsity"]
    layers = model.model.language_model.layers
    weights = [m.weight for layer in layers for n, m in layer.named_modules() if n.endswith("_proj")]
    pruned, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    assert abs(pruned - 0.5 * total) <= 1


def test_figures_make_the_heat_map_and_tables(full, tmp_path):
    results = tmp_path / "results"
    (results / "map").mkdir(parents=True)
    (results / "map" / "results.jsonl").write_text((full.out_dir / RESULTS).read_text())
    report = make_figures(results, tmp_path / "figs", formats=("png",))
    assert tmp_path / "figs" / "sensitivity_map.png" in report.made
    assert (tmp_path / "figs" / "map_table.md").read_text() == (full.out_dir / "map_table.md").read_text()
    assert "sensitivity_map" not in report.skipped


def test_too_few_prompts_and_bad_configs_are_refused(setup, tmp_path):
    model, processor, calibration, benches = setup
    with pytest.raises(Exception, match="5 multimodal prompts asked for, but the benchmarks hold 4"):
        run_map_study(model, processor, calibration, benches, tmp_path / "m", MapConfig(map_items=5), progress=False)
    assert not (tmp_path / "m").exists()
    for kwargs, message in [(dict(map_sparsity=1.0), r"map_sparsity must be in \(0, 1\), got 1.0"),
                            (dict(map_groups=("attn", "mixer")), "unknown map group"),
                            (dict(map_pool="tamp"), "unknown probe pool"),
                            (dict(map_items=0), "map_items, batch_size and max_new_tokens must be >= 1")]:
        with pytest.raises(ConfigError, match=message):
            MapConfig(**kwargs)


@pytest.mark.parametrize("argv, message", [
    (["probe", "--map", "--map-sparsity", "1.5"], "map_sparsity must be in (0, 1), got 1.5"),
    (["probe", "--map", "--map-groups", "attn", "mixer"], "unknown map group ['mixer']"),
    (["probe", "--map", "--map-items", "0"], "map_items, batch_size and max_new_tokens must be >= 1"),
    (["prune", "--allocation", "owl", "--pattern", "2:4"], "allocation 'owl' cannot be combined with pattern 2:4"),
    (["prune", "--allocation", "lumpy"], "allocation must be one of"),
    (["prune", "--allocation", "map"], "allocation 'map' needs allocation_map"),
    (["prune", "--allocation", "owl", "--allocation-lambda", "0.7"], "allocation_lambda must be in [0, 0.5)"),
])
def test_cli_refuses_bad_map_and_allocation_values_with_exit_2(argv, message, tmp_path, capsys):
    required = {"probe": ["--model", str(tmp_path / "m"), "--calib", str(tmp_path / "c.json"), "--images",
                          str(tmp_path), "--bench", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o")],
                "prune": ["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]}[argv[0]]
    assert main([*argv, *required]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_one_dense_pass_gives_the_masks_of_pruning_each_cell_on_its_own(setup, monkeypatch):
    import atv.experiments.sensitivity_map as sensitivity_map

    model, _, calibration, _ = setup
    passes = []

    def counted(model, config, calibration, **kwargs):
        passes.append((config.layers, config.propagate))
        return compute_masks(model, config, calibration, **kwargs)

    monkeypatch.setattr(sensitivity_map, "compute_masks", counted)
    probe = attach_probe_(model)
    try:
        masks = sensitivity_map.LayerMasks(model, probe, calibration, MapConfig(map_items=3))
        cells = [{"layer": 0, "pathway": "visual", "group": "attn"}, {"layer": 1, "pathway": "text", "group": "attn"},
                 {"layer": 1, "pathway": "visual", "group": "ffn"}, {"layer": 0, "pathway": "text", "group": "ffn"}]
        for cell in cells:
            masks.prune_(cell)
            prefix = "mlp" if cell["group"] == "ffn" else "self_attn"
            names = [n for n in probe.routed[cell["layer"]] if n.startswith(prefix)]
            shared = {n: probe.routed[cell["layer"]][n].path(cell["pathway"]).weight.clone() for n in names}
            assert all(cell["pathway"] in probe.routed[cell["layer"]][n].paths for n in names)
            assert sum(len(r.paths) for r in probe.routed_linears()) == len(names)  # nothing else was touched
            probe.reset_()
            probe.prune_path_(cell["pathway"], PruneConfig("wanda", sparsity=0.7, pool="all", layers=(cell["layer"],),
                                                           targets=tuple(names)), calibration, progress=False)
            for n in names:
                assert torch.equal(probe.routed[cell["layer"]][n].path(cell["pathway"]).weight, shared[n])
            probe.reset_()
    finally:
        probe.unload()
    # one pass for layers 0 and 1; layer 0's masks were dropped when the map moved on, so revisiting it re-runs
    assert passes == [((0, 1), "dense"), ((0, 1), "dense")]


def _prompts(setup):
    _, _, _, benches = setup
    return answer_prompts([load_benchmark(benches[0])], 4, 0)


def test_replaying_from_a_layer_scores_exactly_as_full_forwards(setup):
    model, processor, calibration, _ = setup
    prompts = _prompts(setup)
    probe = attach_probe_(model)
    try:
        states, reference = prompt_states(model, processor, prompts, batch_size=3,  # batches of 3 and 1 prompts
                                          adapter=probe.adapter)
        direct = prompt_reference(model, processor, prompts, batch_size=3)
        for key in direct.ids:
            assert torch.equal(reference.ids[key], direct.ids[key])
            assert torch.equal(reference.positions[key], direct.positions[key])
            got, want = reference.distributions[key], direct.distributions[key]
            assert torch.equal(got.top1, want.top1) and torch.equal(got.log_rest, want.log_rest)
            # the LM head on the scored rows only: float noise of a matmul of another height (here 5e-7 on the
            # 1-prompt batch; 0 on smol-llava), the layers themselves replay bitwise
            torch.testing.assert_close(got.log_probs, want.log_probs, rtol=0, atol=1e-6)
        width = max(len(i) for i in direct.ids.values())  # every prompt has the same length here: no padding
        assert states.nbytes == 2 * 4 * width * 32 * 4  # layers x prompts x tokens x hidden x fp32 bytes
        dense = replayed_fidelity(model, states, reference, 0, adapter=probe.adapter)
        assert dense.kl_items == [0.0] * 4 and dense.top1_items == [100.0] * 4
        for layer, path, names in [(0, "text", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                   (1, "visual", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))]:
            probe.prune_path_(path, PruneConfig("wanda", sparsity=0.7, layers=(layer,), targets=names), calibration,
                              progress=False)
            fast = replayed_fidelity(model, states, reference, layer, adapter=probe.adapter)
            slow = prompt_fidelity(model, processor, prompts, reference, batch_size=3)
            assert fast.top1_items == slow.top1_items
            assert fast.kl_items == pytest.approx(slow.kl_items, rel=1e-6, abs=1e-8)  # KLs here are 1e-5..1e-4
            assert fast.kl_items[:3] == slow.kl_items[:3]  # the 3-prompt batch: the same arithmetic, bitwise
            assert min(fast.kl_items) > 1e-6
            probe.reset_()
        for bad in (-1, 2):
            with pytest.raises(ValueError, match=f"first_layer must be in \\[0, 2\\) for states of the same model, "
                                                 f"got {bad}"):
                replayed_fidelity(model, states, reference, bad, adapter=probe.adapter)
    finally:
        probe.unload()


def test_logits_the_replay_cannot_reproduce_are_refused_and_the_map_uses_full_forwards(setup, full, tmp_path,
                                                                                        monkeypatch, caplog):
    import atv.experiments.sensitivity_map as sensitivity_map

    model, processor, _, _ = setup
    head = LlavaAdapter.logits
    monkeypatch.setattr(LlavaAdapter, "logits", lambda self, model, hidden: head(self, model, hidden) * 1.01)
    with pytest.raises(UnsupportedModelError, match="the logits replayed from the decoder layers differ from the "
                                                    "model's forward by"):
        prompt_states(model, processor, _prompts(setup))
    monkeypatch.setattr(sensitivity_map, "replayed_fidelity", None)  # the full forwards must not need it
    with caplog.at_level("WARNING"):
        slow = _run(setup, tmp_path / "slow")
    assert "the map scores every cell with full forwards" in caplog.text
    # the same cells as the replayed map's (items stored to 6 decimals; the head's float noise may cross one)
    assert [v for r in slow.records for v in r["kl_items"]] == \
        pytest.approx([v for r in full.records for v in r["kl_items"]], rel=0, abs=1.5e-6)
    assert [r["top1_items"] for r in slow.records] == [r["top1_items"] for r in full.records]


def test_the_map_scores_cells_by_replay_not_by_full_forwards(setup, tmp_path, monkeypatch):
    import atv.experiments.sensitivity_map as sensitivity_map

    monkeypatch.setattr(sensitivity_map, "prompt_fidelity", None)
    assert _run(setup, tmp_path / "fast").computed == 9


def test_map_benchmarks_gives_retention_with_paired_intervals(setup, tmp_path):
    model, processor, calibration, benches = setup
    config = MapConfig(map_items=3, batch_size=2, map_benchmarks=True, map_groups=("ffn",))
    result = run_map_study(model, processor, calibration, benches, tmp_path / "m", config, progress=False)
    dense, cells = result.records[0], result.records[1:]
    assert dense["mean_retention"] == 100.0 and dense["intervals"]["mean_retention"] == [100.0, 100.0]
    for record in cells:
        assert set(record["intervals"]) >= {"kl", "top1", "scores", "retention", "mean_retention"}
        look = record["items"]["look"]["scores"]
        assert record["intervals"]["scores"]["look"] == score_interval(look, "look", Bootstrap(seed=0)).to_list()
        low, high = record["intervals"]["mean_retention"]
        assert low <= record["mean_retention"] <= high


def test_pathway_contrast_by_hand():
    def cell(layer, path, group, kl):
        return {"cell": {"layer": layer, "pathway": path, "group": group, "sparsity": 0.7}, "kl_items": kl}

    records = [{"cell": {"pathway": "dense"}, "kl_items": [0.0, 0.0, 0.0]},
               cell(0, "text", "attn", [0.4, 0.2, 0.6]), cell(1, "text", "attn", [0.2, 0.2, 0.2]),
               cell(0, "visual", "attn", [0.1, 0.1, 0.1]), cell(1, "visual", "attn", [0.1, 0.3, 0.2]),
               cell(0, "text", "ffn", [1.0, 1.0, 1.0]), cell(0, "visual", "ffn", [0.5, 0.5, 0.5])]
    attn = pathway_contrast(records, "attn", Bootstrap(resamples=300, seed=1))
    per_prompt = [0.3 - 0.1, 0.2 - 0.2, 0.4 - 0.15]  # mean over layers of text minus visual, per prompt
    assert attn["text"] == pytest.approx(0.3) and attn["visual"] == pytest.approx(0.15) and attn["cells"] == 4
    assert attn["diff"] == pytest.approx(sum(per_prompt) / 3)
    want = mean_interval(per_prompt, "map contrast attn", Bootstrap(resamples=300, seed=1)).to_list()
    assert attn["diff_ci"] == pytest.approx(want)
    both = pathway_contrast(records)
    assert both["cells"] == 6 and both["text"] == pytest.approx((0.4 + 0.2 + 0.6 + 0.6 + 3.0) / 9)
    with pytest.raises(ToolkitError, match="no visual cells of group 'ffn' with per-prompt KL"):
        pathway_contrast(records[:-1], "ffn")
