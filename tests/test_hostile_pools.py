"""Hostile calibration batches: a pool that selects no token, a pool of very few tokens, image tokens without
image features. Each is refused (or flagged) in one line before any weight changes, never a silent mask."""

import copy
import functools
import logging

import pytest
import torch
from tiny_families import FamilyUnavailable, build_family
from tiny_models import build_tiny

from mot_probe import attach_probe_
from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks, prune_
from pruning.errors import CalibrationError

TINY = ("llava", "smolvlm", "qwen3_vl_moe")  # tests/tiny_models.py (qwen3_vl_moe: fused MoE experts)
FAMILIES = ("deepseek_ocr2", "granite4_vision", "unlimited_ocr")  # tests/tiny_families.py (the reports)


@functools.lru_cache(maxsize=None)
def _built(family):
    try:
        return build_tiny(family, batch=2) if family in TINY else build_family(family)
    except FamilyUnavailable as err:
        pytest.skip(str(err))


def _model_and_inputs(family):
    model, inputs = _built(family)
    return copy.deepcopy(model), dict(inputs)


def _visual(model, inputs):
    return get_adapter(model).visual_mask_of(model, inputs)


def _only_image_tokens(model, inputs):
    """The batch with every text position turned into padding: its valid positions are all image tokens."""
    return {**inputs, "attention_mask": _visual(model, inputs).to(inputs["attention_mask"].dtype)}


def _image_tokens_padded(model, inputs):
    """The batch with every image position turned into padding: image ids present, no valid visual token."""
    keep = inputs["attention_mask"] * (~_visual(model, inputs)).to(inputs["attention_mask"].dtype)
    return {**inputs, "attention_mask": keep}


EMPTY_POOLS = [  # (config, hostile batch, pool name in the message)
    pytest.param(lambda: PruneConfig("wanda", pool="text"), _only_image_tokens, "text", id="wanda-text"),
    pytest.param(lambda: PruneConfig("atv"), _only_image_tokens, "atv", id="atv-k0"),
    pytest.param(lambda: PruneConfig("wanda", pool="visual"), _image_tokens_padded, "visual", id="wanda-visual"),
]


@pytest.mark.parametrize("family", TINY + FAMILIES)
@pytest.mark.parametrize("make, hostile, pool", EMPTY_POOLS)
def test_a_pool_that_selects_no_token_is_refused_before_any_weight_changes(family, make, hostile, pool):
    model, inputs = _model_and_inputs(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = rf"^decoder layer 0: the '{pool}' calibration pool selected no token in any batch \(.*; calibrate on"
    with pytest.raises(CalibrationError, match=match):
        prune_(model, make(), [hostile(model, inputs)], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sparsegpt_refuses_an_empty_pool_too():
    model, inputs = _model_and_inputs("llava")
    with pytest.raises(CalibrationError, match="^decoder layer 0: the 'text' calibration pool selected no token"):
        prune_(model, PruneConfig("sparsegpt", pool="text"), [_only_image_tokens(model, inputs)], progress=False)


def test_the_refusal_names_the_first_pruned_layer_and_counts_every_batch():
    model, inputs = _model_and_inputs("llava")
    hostile = _only_image_tokens(model, inputs)
    n_visual = int(hostile["attention_mask"].sum())
    with pytest.raises(CalibrationError, match=rf"^decoder layer 1: the 'text' .* \({2 * n_visual} non-padding "
                                               rf"tokens: 0 text, {2 * n_visual} visual\)"):
        compute_masks(model, PruneConfig("wanda", pool="text", layers=(1,)), [hostile, hostile], progress=False)
    # one batch with text tokens among the hostile ones: the pool is not empty, the run goes through
    report = compute_masks(model, PruneConfig("wanda", pool="text", layers=(1,)), [hostile, inputs], progress=False)
    assert report.layers[0].pooled_tokens == int((inputs["attention_mask"].bool() & ~_visual(model, inputs)).sum())


def test_the_mot_probe_refuses_an_empty_pool_and_leaves_both_paths_dense():
    model, inputs = _model_and_inputs("llava")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = attach_probe_(model)
    with pytest.raises(CalibrationError, match="the 'text' calibration pool selected no token"):
        probe.prune_path_("visual", PruneConfig("wanda", pool="text"), [_only_image_tokens(model, inputs)],
                          progress=False)
    assert probe.extra_parameters() == 0  # no path copy left behind
    unloaded = probe.unload()
    assert all(torch.equal(before[k], v) for k, v in unloaded.state_dict().items())


def test_a_pool_with_fewer_tokens_than_the_narrowest_input_is_flagged_and_logged(caplog):
    model, inputs = _model_and_inputs("llava")
    one = {k: v[:1] for k, v in inputs.items()}
    widths = [lin.in_features for lin in get_adapter(model).named_linears(model, 0).values()]
    n_text = int((one["attention_mask"].bool() & ~_visual(model, one)).sum())
    assert n_text < min(widths) <= int(one["attention_mask"].sum()) * 2  # the batch sits on both sides
    with caplog.at_level(logging.WARNING, logger="pruning.engine"):
        thin = compute_masks(copy.deepcopy(model), PruneConfig("wanda", pool="text"), [one], progress=False)
    assert [layer.thin_pool for layer in thin.layers] == [True, True]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "rank-deficient" in
                r.getMessage()]
    assert len(warnings) == 1, warnings  # one per run, not one per layer
    assert warnings[0].startswith(f"2 of 2 layers: the 'text' calibration pool selected fewer tokens than a target "
                                  f"has input features (fewest: {n_text} at layer 0)"), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pruning.engine"):
        full = compute_masks(copy.deepcopy(model), PruneConfig("wanda"), [one, one], progress=False)
    assert [layer.thin_pool for layer in full.layers] == [False, False]
    assert "rank-deficient" not in caplog.text


@pytest.mark.parametrize("family", TINY + FAMILIES)
def test_image_tokens_without_image_features_are_refused(family):
    model, inputs = _model_and_inputs(family)
    no_pixels = {k: v for k, v in inputs.items() if not v.is_floating_point()}
    n_visual = int(_visual(model, inputs).sum())
    match = rf"^calibration batch has {n_visual} image/video token positions .* but no image features .*; pass"
    with pytest.raises(CalibrationError, match=match):
        compute_masks(model, PruneConfig("wanda"), [no_pixels], progress=False)
