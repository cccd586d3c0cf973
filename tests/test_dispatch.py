"""The MoT probe and the evaluation harness on a model dispatched by accelerate with decoder layers on
disk (weights on the meta device, loaded by hooks per forward): the same outputs, probe masks and
scores as the model held in memory."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_offload import _dispatched
from tiny_models import build_tiny
from tiny_processors import make_processor

from evaluation import evaluate, load_benchmark
from mot_probe import RoutedLinear, attach_probe_
from pruning.config import PruneConfig
from pruning.offload import offloaded_modules

LAYOUTS = [("disk", "disk"), ("cpu", "disk")]


@pytest.fixture(scope="module")
def llava():
    model, batch = build_tiny("llava", seed=0, batch=2, padded=True)
    return model, batch


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


@pytest.mark.parametrize("layer_devices", LAYOUTS)
def test_probe_on_disk_dispatched_model_matches_the_probe_in_memory(tmp_path, llava, layer_devices):
    model, batch = llava
    dense = _logits(model, batch)
    plain = copy.deepcopy(model)
    dispatched = _dispatched(tmp_path, copy.deepcopy(model), layer_devices)
    hooked = sum(hasattr(m, "_hf_hook") for m in dispatched.modules())
    assert any(offloaded_modules(dispatched))  # the weights really live on disk

    probes = [attach_probe_(plain), attach_probe_(dispatched)]
    assert torch.equal(_logits(dispatched, batch), dense)  # attach is exact under hooks
    config = PruneConfig("wanda", sparsity=0.5, pool="visual")
    for probe in probes:
        probe.prune_path_("visual", config, [batch], progress=False)
    pruned = _logits(plain, batch)
    assert not torch.equal(pruned, dense)
    assert torch.equal(_logits(dispatched, batch), pruned)  # same masks, same routed forward

    probes[1].reset_()
    assert torch.equal(_logits(dispatched, batch), dense)
    probes[1].unload()
    assert not any(isinstance(m, RoutedLinear) for m in dispatched.modules())
    assert sum(hasattr(m, "_hf_hook") for m in dispatched.modules()) == hooked
    assert torch.equal(_logits(dispatched, batch), dense)


@pytest.mark.parametrize("layer_devices", LAYOUTS)
def test_evaluation_scores_of_a_disk_dispatched_model_equal_the_in_memory_ones(tmp_path, llava, layer_devices):
    model, _ = llava
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    items = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        items.append({"id": str(i), "image": f"images/{i}.png", "question": "what is shown",
                      "options": ["one", "two", "red cat"], "answer": ["one", "two", "red cat"][i]})
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in items) + "\n")
    bench = load_benchmark(tmp_path / "bench.jsonl")
    processor = make_processor("llava", model)
    dispatched = _dispatched(tmp_path, copy.deepcopy(model), layer_devices)

    want = evaluate(model, processor, [bench], progress=False, return_items=True)
    got = evaluate(dispatched, processor, [bench], progress=False, return_items=True)
    assert got.results[0].score == want.results[0].score
    assert [i.details for i in got.results[0].items] == [i.details for i in want.results[0].items]
    assert len(got.results[0].items) == 3 and all("logprobs" in i.details for i in want.results[0].items)
