"""Every family's adapter: exact layer-by-layer replay from the captured inputs (and the logits after it), and
the modality mask."""

import pytest
import torch
from family_checks import check_logits, replayed
from tiny_models import BOI, EOI, FAMILIES, IMAGE, VEND, VIDEO, VSTART, build_tiny

from pruning.adapters import GenericAdapter, calls_after_layers, get_adapter, supported_model_types
from pruning.errors import UnsupportedModelError


def _final_hidden(model, inputs):
    """The input of the decoder's final norm in the model's own forward: (B, T, C)."""
    adapter = get_adapter(model)
    found = {}
    hook = adapter.language_model(model).norm.register_forward_pre_hook(lambda _m, args: found.update(h=args[0]))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        hook.remove()
    return found["h"]


def _replayed(model, adapter, inputs):
    """Layer-0 inputs captured once, then every decoder layer replayed in order: (B, T, C)."""
    return replayed(model, inputs, adapter)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_from_captured_inputs_equals_the_full_forward(family):
    model, inputs = build_tiny(family, batch=2, padded=True)
    adapter = get_adapter(model)
    assert adapter.name != "generic"
    assert torch.equal(_replayed(model, adapter, inputs), _final_hidden(model, inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_and_head_on_the_replay_give_the_models_logits(family):
    check_logits(*build_tiny(family, batch=2, padded=True))


def test_a_language_model_without_a_known_final_norm_is_named():
    model, _ = build_tiny("llava")
    language_model = get_adapter(model).language_model(model)
    language_model.final = language_model.norm
    del language_model.norm
    with pytest.raises(UnsupportedModelError, match="LlamaModel has no final norm named norm/"):
        get_adapter(model).final_norm(model)


class _StreamsLM(torch.nn.Module):
    """A language model whose forward reduces two residual streams, then norms, after its layer loop."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Identity()])
        self.norm, self.reduce, self.scale = torch.nn.LayerNorm(4), torch.nn.Flatten(-2), torch.nn.Identity()

    def forward(self, h):
        h = self.scale(h)
        for block in self.blocks:
            h = block(h)
        h = self.norm(
            self.reduce(h))
        return h


def test_final_modules_are_the_ones_the_forward_calls_after_its_layer_loop_in_order():
    lm = _StreamsLM()
    assert calls_after_layers(lm, lm.blocks) == [("reduce", 1), ("norm", 1)]
    assert calls_after_layers(lm, torch.nn.ModuleList()) is None  # not its layers: no loop over them
    adapter = GenericAdapter()
    adapter.language_model, adapter.decoder_layers = (lambda model: lm), (lambda model: lm.blocks)
    assert adapter.final_modules(None) == [lm.reduce, lm.norm]
    namespace = {}  # a class whose source cannot be read: the final norm by its name
    exec("import torch\nclass Unread(torch.nn.Module):\n    def forward(self, h):\n        return h\n", namespace)
    unread = namespace["Unread"]()
    unread.layers, unread.final_layernorm = torch.nn.ModuleList(), torch.nn.LayerNorm(4)
    adapter.language_model, adapter.decoder_layers = (lambda model: unread), (lambda model: unread.layers)
    assert adapter.final_modules(None) == [unread.final_layernorm]


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_mask_marks_exactly_the_image_and_video_tokens(family):
    model, inputs = build_tiny(family, batch=2, padded=True)
    adapter = get_adapter(model)
    ids = inputs["input_ids"]
    assert torch.equal(adapter.visual_mask(model, ids), ids == IMAGE)
    assert torch.equal(adapter.capture(model, inputs).visual, ids == IMAGE)
    markers = torch.tensor([[VSTART, VEND, BOI, EOI, 5, VIDEO]])
    expected_video = getattr(model.config, "video_token_id", None) == VIDEO
    assert adapter.visual_mask(model, markers).tolist() == [[False] * 5 + [expected_video]]


def test_gemma3_layers_get_their_own_masks():
    model, inputs = build_tiny("gemma3", batch=1)
    batch = get_adapter(model).capture(model, inputs)
    sliding, full = batch.layer_kwargs[0]["attention_mask"], batch.layer_kwargs[1]["attention_mask"]
    assert not torch.equal(sliding, full)


def test_every_listed_family_is_registered():
    assert set(FAMILIES) <= set(supported_model_types())


def test_generic_fallback_finds_an_unregistered_family():
    model, inputs = build_tiny("llava")
    model.config.model_type = "my_llava_fork"
    adapter = get_adapter(model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.decoder_layers(model) is model.model.language_model.layers
    assert torch.equal(_replayed(model, adapter, inputs), _final_hidden(model, inputs))


def test_generic_fallback_names_the_candidates_when_it_cannot_decide():
    model, _ = build_tiny("llava")
    model.config.model_type = "two_decoders"
    model.extra_decoder = torch.nn.ModuleList([model.model.language_model.layers[0]])
    with pytest.raises(UnsupportedModelError, match="two_decoders.*extra_decoder"):
        get_adapter(model)


def test_capture_puts_back_an_instance_level_forward():
    # accelerate's offload hooks live in a layer's instance-level forward; capture must not drop them
    model, inputs = build_tiny("llava")
    layer = get_adapter(model).decoder_layers(model)[1]
    calls = []
    original = layer.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = hooked
    get_adapter(model).capture(model, inputs)
    assert layer.__dict__["forward"] is hooked
    with torch.no_grad():
        model(**inputs)
    assert calls
