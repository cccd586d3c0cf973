"""Per-method configs: the flat PruneConfig resolves to them (same masks), they round-trip through the flat
dict and a saved recipe, every bad value is refused naming the field and the value, and a new method is one
file (this one registers a toy method without touching pruning/config.py)."""

import copy
import dataclasses

import pytest
import torch
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from atv.cli import main
from atv.experiments.cells import StudySettings
from atv.experiments.eval_job import EvalJob, ProbeCell
from atv.experiments.probe_study import StudyConfig
from atv.experiments.sensitivity_map import MapConfig
from pruning import config as config_module
from pruning.allocation import ALLOCATIONS
from pruning.config import (
    METHOD_CONFIGS,
    OWL,
    ATVConfig,
    CalibratedConfig,
    MagnitudeConfig,
    MapAllocation,
    MethodConfig,
    PruneConfig,
    SparseGPTConfig,
    TAMPConfig,
    Uniform,
    WandaConfig,
    from_dict,
    from_yaml,
    register_method,
)
from pruning.engine import compute_masks, prune_
from pruning.errors import ConfigError
from pruning.execution import ExecutionConfig
from pruning.io import LoadOptions
from pruning.options import check_fields, option, parse_device
from pruning.registry import POOLS, SCORERS, register_pool, register_scorer

EVERY = [MagnitudeConfig(sparsity=0.6, layers=(1,), allocation=OWL(m=3.0, lmbda=0.1)),
         WandaConfig(pool="text", propagate="dense", targets=("mlp.up_proj",)),
         ATVConfig(alpha=0.5, seed=7, allocation=MapAllocation("runs/map/sensitivity_map.json", lmbda=0.2)),
         ATVConfig(visual_ratio=0.25, pattern="2:4"),
         SparseGPTConfig(pool="atv", blocksize=64, percdamp=0.05),
         TAMPConfig(sparsity=0.4)]


@pytest.fixture(scope="module")
def llava():
    model, _ = build_tiny("llava", seed=0)
    return model, [build_tiny("llava", seed=seed)[1] for seed in range(2)]


@pytest.mark.parametrize("config", EVERY, ids=lambda c: type(c).__name__)
def test_to_dict_from_dict_round_trip(config):
    flat = config.to_dict()
    assert flat["method"] == config.method and flat["scorer"] == config.scorer
    assert from_dict(flat) == config and type(config).from_dict(flat) == config
    assert MethodConfig.from_dict(flat) == config
    assert PruneConfig(**{k: v for k, v in flat.items() if k != "scorer"}).resolved == config  # the flat form too


def test_the_flat_form_resolves_to_the_method_config():
    assert type(PruneConfig("atv").resolved) is ATVConfig and PruneConfig("atv").resolved == ATVConfig()
    assert PruneConfig("sparsegpt", pool="atv", percdamp=0.05).resolved == SparseGPTConfig(pool="atv", percdamp=0.05)
    assert PruneConfig("wanda", allocation="owl", owl_m=3.0).resolved == WandaConfig(allocation=OWL(m=3.0))
    assert PruneConfig("magnitude").resolved == MagnitudeConfig() and MagnitudeConfig().pool is None
    assert (ATVConfig().scorer, ATVConfig().pool, TAMPConfig().pool) == ("wanda", "atv", "tamp")
    assert set(METHOD_CONFIGS) == {"magnitude", "wanda", "atv", "sparsegpt", "tamp"}
    with pytest.raises(ConfigError, match=r"blocksize=64 is a setting of method 'sparsegpt', not of 'wanda'"):
        PruneConfig("wanda", blocksize=64)
    with pytest.raises(ConfigError, match=r"owl_m=3.0 is a setting of another allocation than 'uniform'"):
        PruneConfig("wanda", owl_m=3.0)
    with pytest.raises(TypeError):
        ATVConfig(blocksize=64)  # a method's config takes only its own settings


@pytest.mark.parametrize("flat, method_config", [
    (PruneConfig("atv", sparsity=0.5), ATVConfig(sparsity=0.5)),
    (PruneConfig("wanda", pool="visual", layers=(1,)), WandaConfig(pool="visual", layers=(1,))),
    (PruneConfig("sparsegpt", pool="text"), SparseGPTConfig(pool="text")),
    (PruneConfig("magnitude", pattern="2:4"), MagnitudeConfig(pattern="2:4")),
    (PruneConfig("wanda", sparsity=0.6, allocation="owl", owl_m=3.0), WandaConfig(sparsity=0.6, allocation=OWL(3.0))),
], ids=["atv", "wanda-visual", "sparsegpt", "magnitude-2:4", "wanda-owl"])
def test_either_form_gives_bit_identical_masks(llava, flat, method_config):
    model, batches = llava
    a = compute_masks(copy.deepcopy(model), flat, batches, progress=False)
    b = compute_masks(copy.deepcopy(model), method_config, batches, progress=False)
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.config == b.config == method_config.to_dict()


# -- a new method in one file --------------------------------------------------------------------------
@pytest.fixture
def toy_methods():
    """Registered here, next to their scorer and pool: nothing else is edited."""
    @register_scorer("largest", needs=None)
    def largest(weight):  # prunes the largest weights
        return -weight.abs()

    @register_method("anti-magnitude", scorer="largest", pool=None)
    @dataclasses.dataclass
    class AntiMagnitudeConfig(MethodConfig):
        pass

    @register_pool("first")
    def first(visual, valid, drifts, params):  # position 0 of every sample
        pool = torch.zeros_like(valid)
        pool[:, 0] = True
        return pool, []

    @register_method("wanda-first", scorer="wanda", pool="first")
    @dataclasses.dataclass
    class WandaFirstConfig(CalibratedConfig):
        pass

    yield AntiMagnitudeConfig, WandaFirstConfig
    SCORERS.pop("largest")
    POOLS.pop("first")
    METHOD_CONFIGS.pop("anti-magnitude")
    METHOD_CONFIGS.pop("wanda-first")


def test_a_method_registered_in_one_file_prunes(llava, toy_methods):
    anti, first = toy_methods
    model, batches = llava
    report = prune_(copy.deepcopy(model), anti(sparsity=0.5), keep_masks=True, progress=False)
    for name, mask in report.masks.items():  # a row's largest half is pruned
        assert int(mask.sum(dim=1).min()) == int(mask.sum(dim=1).max()) == mask.shape[1] // 2, name
    q = "model.language_model.layers.0.self_attn.q_proj"
    weight = dict(model.named_modules())[q].weight
    kept_max = weight.abs().masked_fill(report.masks[q], float("-inf")).max(dim=1).values
    pruned_min = weight.abs().masked_fill(~report.masks[q], float("inf")).min(dim=1).values
    assert bool((kept_max <= pruned_min).all())
    assert PruneConfig("anti-magnitude").resolved == anti()  # and from the flat form, by name
    config = first(layers=(0,))
    assert config.pool == "first" and from_dict(config.to_dict()) == config
    assert compute_masks(copy.deepcopy(model), config, batches, progress=False).layers[0].pooled_tokens == 2


def test_unregistered_config_class_is_refused():
    @dataclasses.dataclass
    class Loose(MethodConfig):
        pass

    with pytest.raises(ConfigError, match="Loose is not a registered method"):
        Loose()


def test_the_old_method_table_still_registers_with_a_warning(monkeypatch):
    assert config_module.METHODS["atv"] == ("wanda", "atv")
    with pytest.warns(DeprecationWarning, match="register_method"):
        monkeypatch.setitem(config_module.METHODS, "text-wanda", ("wanda", "text"))
    assert PruneConfig("text-wanda").pool == "text"
    monkeypatch.undo()
    assert "text-wanda" not in METHOD_CONFIGS


# -- a saved recipe loads in Python ----------------------------------------------------------------------
def test_a_saved_recipe_loads_as_the_config_it_ran(tmp_path):
    model, _ = build_tiny("llava")
    folder = save_model_dir("llava", model, tmp_path / "model")
    calib, images = write_calibration(tmp_path / "calib", n=2)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(folder), "--method", "sparsegpt", "--pool", "atv", "--sparsity", "0.6",
                 "--alpha", "0.5", "--percdamp", "0.02", "--layers", "1", "--allocation", "owl", "--owl-m", "4",
                 "--calib", str(calib), "--images", str(images), "--nsamples", "2", "--out", str(out)]) == 0
    used = SparseGPTConfig(sparsity=0.6, pool="atv", alpha=0.5, percdamp=0.02, layers=(1,), allocation=OWL(m=4.0))
    assert from_yaml(out / "recipe.yaml") == used
    assert SparseGPTConfig.from_yaml(out / "recipe.yaml") == used == MethodConfig.from_yaml(out / "recipe.yaml")
    with pytest.raises(ConfigError, match="ATVConfig is method 'atv', but the settings name method 'sparsegpt'"):
        ATVConfig.from_yaml(out / "recipe.yaml")
    (tmp_path / "typo.yaml").write_text("method: wanda\nsparsity: 1.5\n")
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        from_yaml(tmp_path / "typo.yaml")


# -- bad values: the field and the value named -----------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: WandaConfig(sparsity=1.5), r"sparsity must be in \[0, 1\), got 1.5"),
    (lambda: MagnitudeConfig(seed=-1), r"seed must be in \[0, 2\*\*32\), got -1"),
    (lambda: MagnitudeConfig(seed=True), r"seed must be an integer, got True"),
    (lambda: MagnitudeConfig(propagate="both"), r"propagate must be one of \['pruned', 'dense'\], got 'both'"),
    (lambda: MagnitudeConfig(layers=5), r"layers must be a list, got 5"),
    (lambda: WandaConfig(pool="images"), r"unknown pool 'images'; choose one of \['all', "),
    (lambda: ATVConfig(alpha=0), r"alpha must be > 0, got 0.0"),
    (lambda: ATVConfig(alpha=float("nan")), r"alpha must be a finite number, got nan"),
    (lambda: ATVConfig(visual_ratio=1.2), r"visual_ratio must be in \[0, 1\], got 1.2"),
    (lambda: WandaConfig(visual_ratio=0.3), r"visual_ratio is used only by the 'atv' and 'random-visual' pools"),
    (lambda: SparseGPTConfig(blocksize=0), r"blocksize must be >= 1, got 0"),
    (lambda: SparseGPTConfig(percdamp="x"), r"percdamp must be a number, got 'x'"),
    (lambda: TAMPConfig(pattern="2-4"), r"pattern must look like 'N:M' \(e.g. '2:4'\), got '2-4'"),
    (lambda: WandaConfig(allocation=OWL(), pattern="2:4"), r"allocation 'owl' cannot be combined with pattern 2:4"),
    (lambda: WandaConfig(allocation="owl"), r"allocation must be Uniform\(\), OWL\(...\) or MapAllocation"),
    (lambda: OWL(m=0), r"owl_m must be > 0, got 0.0"),
    (lambda: OWL(lmbda=0.5), r"allocation_lambda must be in \[0, 0.5\), got 0.5"),
    (lambda: MapAllocation(3), r"allocation_map must be a path, got 3"),
    (lambda: from_dict({"method": "wanda", "alpah": 2}), r"unknown setting 'alpah' of method 'wanda'"),
    (lambda: from_dict({"method": "obs"}), r"unknown method 'obs'; choose one of \['atv', "),
    (lambda: from_dict({"allocation": "layerwise"}), r"allocation must be one of \['uniform', 'owl', 'map'\]"),
    (lambda: from_dict({"method": "wanda", "scorer": "magnitude"}), r"scores with 'wanda', not scorer='magnitude'"),
    (lambda: from_dict({"allocation": OWL(3.0), "owl_m": 4.0}), r"allocation=OWL\(m=3.0, lmbda=0.08\) is given "
                                                                r"whole: drop \{'owl_m': 4.0\}"),
    (lambda: ExecutionConfig(schedule="one-pass"), r"schedule must be one of \[.*\], got 'one-pass'"),
    (lambda: ExecutionConfig(stash_budget_gb=-1), r"stash_budget_gb must be >= 0, got -1.0"),
    (lambda: LoadOptions(dtype="float64"), r"dtype must be one of \['auto', .*\], got 'float64'"),
    (lambda: StudyConfig(pools=("pixels",)), r"unknown probe pool 'pixels'; choose one of \['mixed', 'text'"),
    (lambda: StudyConfig(pathways=()), r"unknown pathway \(none\); choose from \['text', 'visual'\]"),
    (lambda: StudyConfig(sparsities=(0.5, 1.0)), r"sparsities must be in \(0, 1\), got \[0.5, 1.0\]"),
    (lambda: StudyConfig(method="atv"), r"method must be one of \['wanda', 'sparsegpt'\], got 'atv'"),
    (lambda: MapConfig(batch_size=0), r"map_items, batch_size and max_new_tokens must be >= 1, got 32, 0 and 8"),
    (lambda: MapConfig(map_groups=("mixer",)), r"unknown map group \['mixer'\]"),
    (lambda: ProbeCell("r.jsonl", "text", "pixels", 0.5), r"pool must be one of \['text', 'visual', 'mixed'\]"),
    (lambda: ProbeCell("r.jsonl", "text", "text", 1), r"sparsity must be in \(0, 1\), got 1.0"),
    (lambda: EvalJob(("a.jsonl",), model="m", max_new_tokens=0), r"batch_size and max_new_tokens must be >= 1, got "
                                                                  r"8 and 0"),
    (lambda: EvalJob(("a.jsonl",), model="m", seed=2**32), r"seed must be in \[0, 2\*\*32\), got 4294967296"),
])
def test_bad_values_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_one_declaration_of_the_shared_study_settings():
    shared = {f.name: f for f in dataclasses.fields(StudySettings)}
    for cls in (StudyConfig, MapConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert all(fields[name] is field for name, field in shared.items()), cls
    config = StudyConfig(pathways=["text"], sparsities=[0.5])  # lists from a recipe become tuples
    assert config.pathways == ("text",) and config.sparsities == (0.5,)


def test_check_fields_converts_and_checks_by_annotation():
    @dataclasses.dataclass(frozen=True)
    class Job:
        sizes: tuple[float, ...] = option((0.5,), within="(0, 1]")
        count: int | None = option(None, within=">= 1")
        fast: bool = option(False)

        def __post_init__(self):
            check_fields(self)

    assert Job(sizes=[1]).sizes == (1.0,) and isinstance(Job(sizes=[1]).sizes[0], float)
    assert Job(count=None).count is None and Job(count=3).count == 3
    with pytest.raises(ConfigError, match=r"count must be >= 1, got 0"):
        Job(count=0)
    with pytest.raises(ConfigError, match=r"fast must be True or False, got 'yes'"):
        Job(fast="yes")
    with pytest.raises(ConfigError, match=r"sizes must be in \(0, 1\], got \[\]"):
        Job(sizes=())


def test_one_device_parser():
    assert parse_device("device", None) is None and parse_device("device", "cpu").type == "cpu"
    with pytest.raises(ConfigError, match=r"offload_device must name a torch device .* got 'gpu7': device 'gpu7' is "
                                          r"not a torch device \("):
        parse_device("offload_device", "gpu7")
    with pytest.raises(ConfigError, match=r"offload_device must be a device that holds data .*got 'meta': device "
                                          r"'meta' holds no data"):
        parse_device("offload_device", "meta")


def test_allocations_are_small_configs():
    assert tuple(config_module.ALLOCATION_CONFIGS) == ALLOCATIONS  # one list of kinds
    assert WandaConfig().allocation == Uniform() and Uniform.kind == "uniform"
    assert OWL(3.0, 0.1) == OWL(m=3.0, lmbda=0.1) and MapAllocation("m.json").lmbda == 0.08
    assert WandaConfig(allocation=OWL()).needs_calibration and not MagnitudeConfig().needs_calibration
    assert MagnitudeConfig(allocation=OWL()).needs_calibration  # owl's Wanda scores need activations


def test_putting_back_the_deprecated_method_tables_entries_keeps_each_methods_class():
    """Code of earlier versions saves and restores ``METHODS`` (clear, then update): the built-in classes, with
    their own settings (SparseGPT's blocksize), must come back, not plain stand-ins."""
    import warnings

    from pruning import config as config_module

    saved_configs = dict(config_module.METHOD_CONFIGS)
    saved = dict(config_module.METHODS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            config_module.METHODS.update(saved)
        assert config_module.METHOD_CONFIGS == saved_configs
        assert config_module.PruneConfig("atv", blocksize=128).resolved.method == "atv"
    finally:
        config_module.METHOD_CONFIGS.clear()
        config_module.METHOD_CONFIGS.update(saved_configs)
