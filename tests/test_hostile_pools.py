"""Hostile calibration batches: image tokens without image features are refused in one line."""

import copy
import functools

import pytest
from tiny_families import FamilyUnavailable, build_family
from tiny_models import build_tiny

from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks
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


@pytest.mark.parametrize("family", TINY + FAMILIES)
def test_image_tokens_without_image_features_are_refused(family):
    model, inputs = _model_and_inputs(family)
    no_pixels = {k: v for k, v in inputs.items() if not v.is_floating_point()}
    n_visual = int(_visual(model, inputs).sum())
    match = rf"^calibration batch has {n_visual} image/video token positions .* but no image features .*; pass"
    with pytest.raises(CalibrationError, match=match):
        compute_masks(model, PruneConfig("wanda"), [no_pixels], progress=False)
