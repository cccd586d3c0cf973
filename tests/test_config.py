"""Every bad configuration fails at construction, naming the bad value."""

import pytest

from pruning.config import PruneConfig
from pruning.errors import ConfigError
from pruning.execution import ExecutionConfig


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.5}, "sparsity must be in \\[0, 1\\), got 1.5"),
    ({"sparsity": 1.0}, "got 1.0"),
    ({"sparsity": -0.1}, "got -0.1"),
    ({"pattern": "4:4"}, "0 < N < M, got 4:4"),
    ({"pattern": "5:4"}, "got 5:4"),
    ({"pattern": "2-4"}, "'2-4'"),
    ({"pattern": "2:4", "sparsity": 0.6}, "sparsity 0.6 contradicts pattern 2:4"),
    ({"method": "obs"}, "unknown method 'obs'"),
    ({"pool": "images"}, "unknown pool 'images'"),
    ({"method": "magnitude", "pool": "text"}, "uses no calibration"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"visual_ratio": 1.2}, "visual_ratio must be in \\[0, 1\\], got 1.2"),
    ({"propagate": "both"}, "'both'"),
    ({"targets": ()}, "targets is empty"),
])
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "one-pass"}, "'one-pass'"),
    ({"stash_budget_gb": -1.0}, "stash_budget_gb must be >= 0, got -1.0"),
    ({"offload_device": "gpu7"}, "offload_device must name a torch device .* got 'gpu7'"),
    ({"offload": True, "execution_device": "nowhere"}, "got 'nowhere'"),
    ({"execution_device": "cpu"}, "execution_device='cpu' only applies with offload=True"),
    ({"offload": "yes"}, "offload must be True or False, got 'yes'"),
])
def test_bad_execution_config_is_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExecutionConfig(**kwargs)


def test_execution_settings_are_not_prune_settings():
    with pytest.raises(TypeError):
        PruneConfig("atv", offload=True)
    assert ExecutionConfig().activations_device.type == "cpu"
    assert ExecutionConfig(offload=True, execution_device="cpu").layer_device.type == "cpu"


def test_presets_and_pattern_sparsity():
    assert (PruneConfig("atv").scorer, PruneConfig("atv").pool) == ("wanda", "atv")
    assert PruneConfig("sparsegpt", pool="atv").pool == "atv"
    assert PruneConfig("magnitude").pool is None
    assert PruneConfig("wanda", pattern="2:4").sparsity == 0.5
    assert PruneConfig("wanda", pattern="1:4").sparsity == 0.25
    assert PruneConfig("wanda").sparsity == 0.5
    assert PruneConfig("wanda", pattern="4:8").nm == (4, 8)
