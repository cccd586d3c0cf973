"""Token layouts beyond (B, T): visual positions marked by an input instead of a token id (Kosmos-2), and
Linears that read the batch's tokens flattened to (B*T, d) (the shared experts of Step3.7's MoE blocks)."""

import copy
import functools

import pytest
import torch
from tiny_families import IMAGE, build_family

from mot_probe import attach_probe_
from mot_probe.routing import ModalityRouter, RoutedLinear
from pruning.adapters import get_adapter, tokens_align
from pruning.config import PruneConfig
from pruning.engine import _pooled_rows, compute_masks
from pruning.errors import CalibrationError
from pruning.masks import row_mask
from pruning.scores import wanda_scores


@functools.lru_cache(maxsize=None)
def _built(family):
    return build_family(family)


def _fresh(family):
    model, inputs = _built(family)
    return copy.deepcopy(model), inputs


# -- visual positions marked by an input --------------------------------------------------------------
def test_visual_positions_come_from_the_input_that_marks_them():
    model, inputs = _fresh("kosmos-2")
    adapter = get_adapter(model)
    assert adapter.visual_token_ids(model) == ()  # no placeholder id: the ids alone find no visual token
    marked = inputs["image_embeds_position_mask"].bool()
    assert int(marked.sum()) == 8  # 4 image positions per row, 2 rows
    assert torch.equal(adapter.visual_mask_of(model, inputs), marked)
    assert torch.equal(adapter.capture(model, inputs).visual, marked)


def test_a_position_mask_of_another_shape_is_refused():
    model, inputs = _fresh("kosmos-2")
    bad = {**inputs, "image_embeds_position_mask": inputs["image_embeds_position_mask"][:, :-1]}
    with pytest.raises(CalibrationError, match=r"image_embeds_position_mask.*\(2, 14\).*\(2, 15\)"):
        get_adapter(model).visual_mask_of(model, bad)


def test_families_with_token_ids_keep_their_visual_mask():
    model, inputs = _fresh("paligemma")
    adapter = get_adapter(model)
    assert torch.equal(adapter.visual_mask_of(model, inputs), inputs["input_ids"] == IMAGE)


def test_probe_routes_the_positions_an_input_marks():
    """Pruning the visual path changes only what comes at or after the first image position (causal
    attention): the logits before it stay bit-identical, those after it change."""
    model, inputs = _fresh("kosmos-2")
    with torch.no_grad():
        dense = model(**inputs, use_cache=False).logits
    probe = attach_probe_(model)
    probe.prune_path_("visual", PruneConfig("wanda", sparsity=0.5, pool="visual"), [inputs], progress=False)
    with torch.no_grad():
        pruned = model(**inputs, use_cache=False).logits
    first = int(inputs["image_embeds_position_mask"][0].nonzero().min())
    assert torch.equal(pruned[:, :first], dense[:, :first])
    assert not torch.equal(pruned[:, first:], dense[:, first:])
    probe.unload()


# -- tokens flattened to (B*T, d) ---------------------------------------------------------------------
def test_flattened_tokens_line_up_with_the_token_mask():
    assert tokens_align(torch.Size([2, 13]), torch.Size([26]))
    assert tokens_align(torch.Size([2, 13]), torch.Size([2, 1, 13]))
    assert not tokens_align(torch.Size([2, 13]), torch.Size([25]))
    assert not tokens_align(torch.Size([2, 13]), torch.Size([13, 2]))


def test_pooled_rows_of_flattened_tokens_are_the_same_rows():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    pool = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(_pooled_rows(x.reshape(10, 3), pool), x[pool])
    # rows that cannot be the batch's tokens (a cross-attention layer's K/V read the image memory) are all
    # taken: the pool chooses among tokens only
    memory = x.reshape(10, 3)[:9]
    assert torch.equal(_pooled_rows(memory, pool), memory)


def test_routed_linear_routes_flattened_tokens_as_the_tokens_they_are():
    g = torch.Generator().manual_seed(0)
    router = ModalityRouter()
    routed = RoutedLinear(torch.nn.Linear(3, 4), router)
    routed.materialise_("visual").weight.data.zero_()  # the visual path now gives its bias only
    x = torch.randn(2, 5, 3, generator=g)
    visual = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad(), router.route(visual):
        want = routed(x)
        got = routed(x.reshape(10, 3))
    assert torch.equal(got, want.reshape(10, 4))
    assert torch.equal(want[visual], routed.paths["visual"].bias.expand(4, 4))


def test_moe_shared_experts_reading_flattened_tokens_are_pooled_by_modality():
    """Step3.7's MoE block hands its shared experts the (B*T, d) tokens: a text-pool Wanda mask of such a
    Linear is the one computed by hand from its text rows."""
    model, inputs = _fresh("step3p7")
    linear = model.model.language_model.layers[1].mlp.shared_experts.gate_proj
    seen = {}
    hook = linear.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        hook.remove()
    x = seen["x"]
    assert x.shape == (26, 64)  # (B*T, d): 2 rows of 13 tokens
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE)).reshape(-1)
    want = row_mask(wanda_scores(linear.weight, x[text].pow(2).sum(dim=0) / 2), 0.5)
    report = compute_masks(model, PruneConfig("wanda", sparsity=0.5, pool="text", layers=[1]), [inputs],
                           progress=False)
    got = report.masks["model.language_model.layers.1.mlp.shared_experts.gate_proj"]
    assert torch.equal(got, want)
    everything = row_mask(wanda_scores(linear.weight, x[inputs["attention_mask"].bool().reshape(-1)]
                                       .pow(2).sum(dim=0) / 2), 0.5)
    assert not torch.equal(everything, want)  # the pool matters for this Linear

