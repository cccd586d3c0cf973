"""The checks every model family must pass, shared by tests/test_families.py and
scripts/families_table.py. Each check raises AssertionError saying what differs.

- ``check_discovery``: blocks = the language model's list of ``num_hidden_layers`` blocks, outside
  the vision parts; every block has Linear projections. Returns (blocks name, per-layer projections).
- ``check_replay``: capture + layer-by-layer replay is bitwise equal to the last decoder layer's
  output in the model's own forward.
- ``check_logits``: the adapter's final norm and LM head on that replay give the model's own logits, bitwise.
- ``check_probe``: attaching the probe (MoE experts routed too) changes no logit (bitwise); pruning a path
  then ``reset_`` gives the same logits again; ``unload`` restores the state_dict keys and module types.
- ``check_prune``: after ``prune_`` every pruned row holds exactly int(cols * sparsity) zeros.
- ``check_save``: ``save_pretrained`` + ``from_pretrained`` gives the same weights.
"""

from __future__ import annotations

import copy

import torch

from mot_probe import RoutedLinear, attach_probe_
from mot_probe.experts import RoutedExperts
from mot_probe.surgery import unroutable_experts
from pruning.adapters import find_decoder_layers, get_adapter
from pruning.config import PruneConfig
from pruning.engine import prune_
from pruning.experts import find_experts
from pruning.io import check_reloads

SPARSITY = 0.5


def check_discovery(model: torch.nn.Module) -> tuple[str, list[tuple[str, ...]]]:
    name, layers = find_decoder_layers(model)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert len(layers) == n_layers, f"{name} has {len(layers)} blocks, the text config says {n_layers}"
    outside = [w for w in ("vision", "visual", "connector", "resampler", "projector") if w in name]
    assert not outside, f"blocks found at {name}, inside the {outside[0]} part"
    adapter = get_adapter(model)
    names = [adapter.projections(model, i).names for i in range(len(layers))]
    for i, found in enumerate(names):
        assert found, f"block {i} has no projections"
        bad = [n for n in found if not isinstance(layers[i].get_submodule(n), torch.nn.Linear)]
        assert not bad, f"block {i}: {bad} are not nn.Linear"
    return name, names


def replayed(model: torch.nn.Module, inputs: dict, adapter=None) -> torch.Tensor:
    """Layer-0 inputs captured once, then every decoder layer replayed in order: (B, T, C).
    ``adapter`` defaults to the model's own (get_adapter)."""
    adapter = get_adapter(model) if adapter is None else adapter
    batch = adapter.capture(model, inputs)
    h = batch.hidden
    with torch.no_grad():
        for i in range(len(adapter.decoder_layers(model))):
            h = adapter.replay(model, i, h, batch)
    return h


def last_layer_output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The output of the last decoder layer in the model's own forward: (B, T, C)."""
    layers = get_adapter(model).decoder_layers(model)
    found = {}
    hook = layers[-1].register_forward_hook(
        lambda _m, _a, out: found.update(h=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        hook.remove()
    return found["h"]


def check_replay(model: torch.nn.Module, inputs: dict) -> None:
    got, want = replayed(model, inputs), last_layer_output(model, inputs)
    assert torch.equal(got, want), f"replay differs from the full forward by {float((got - want).abs().max()):.3g}"


def check_logits(model: torch.nn.Module, inputs: dict) -> None:
    """The adapter's final norm + LM head on the replayed decoder output give the model's own logits, bitwise."""
    with torch.no_grad():
        got = get_adapter(model).logits(model, replayed(model, inputs))
    want = logits(model, inputs)
    assert got.shape == want.shape, \
        f"replayed logits have shape {tuple(got.shape)}, the full forward's {tuple(want.shape)}"
    assert torch.equal(got, want), \
        f"replayed logits differ from the full forward by {float((got - want).abs().max()):.3g}"


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def check_probe(model: torch.nn.Module, inputs: dict) -> None:
    want, keys = logits(model, inputs), list(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    experts = sum(len(find_experts(layer)) for layer in get_adapter(model).decoder_layers(model))
    shared = bool(unroutable_experts(model))  # only an expert layout the probe cannot route stays shared
    probe = attach_probe_(model, allow_shared_experts=shared)
    assert len(list(probe.routed_experts())) == (0 if shared else experts), "experts were not routed"
    assert torch.equal(logits(model, inputs), want), "the attached probe changed the logits"
    report = probe.prune_path_("visual", PruneConfig("wanda", sparsity=SPARSITY, pool="all"), [inputs],
                               progress=False)
    pruned = {name for layer in report.layers for name in layer.sparsity if "[" in name}  # 'experts.down_proj[3]'
    assert bool(pruned) == (experts > 0 and not shared), f"the path's expert matrices pruned: {sorted(pruned)}"
    probe.reset_()
    assert torch.equal(logits(model, inputs), want), "prune_path_ + reset_ did not give the original logits back"
    probe.unload()
    assert list(model.state_dict()) == keys, "unload changed the state_dict keys"
    assert {n: type(m) for n, m in model.named_modules()} == types, "unload left other module types"
    assert not any(isinstance(m, (RoutedLinear, RoutedExperts)) for m in model.modules()), "a wrapper survived unload"


def check_generation_with_probe(model: torch.nn.Module, inputs: dict) -> None:
    """The attached, unpruned probe generates exactly what the model did: tokens and every step's scores."""
    original = copy.deepcopy(model)
    attach_probe_(model)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got, want = model.generate(**inputs, **kwargs), original.generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, want.scores))


def check_prune(model: torch.nn.Module, inputs: dict, method: str) -> None:
    report = prune_(model, PruneConfig(method, sparsity=SPARSITY), [inputs], progress=False)
    adapter = get_adapter(model)
    for layer in report.layers:
        names = adapter.projections(model, layer.index).names
        linears = {n for n in layer.sparsity if "[" not in n}  # 'experts.down_proj[3]': an expert's matrix
        assert linears == set(names), f"layer {layer.index}: pruned {sorted(layer.sparsity)}"
        for name, linear in adapter.named_linears(model, layer.index, names).items():
            zeros = (linear.weight == 0).sum(dim=1)
            want = int(linear.in_features * SPARSITY)
            assert bool((zeros == want).all()), f"layer {layer.index} {name}: rows with {zeros.unique().tolist()} zeros"


def check_save(model: torch.nn.Module, directory) -> None:
    prune_(model, PruneConfig("magnitude", sparsity=SPARSITY), progress=False)
    model.save_pretrained(directory)
    check_reloads(model, directory)  # the toolkit's own save check passes where the round trip is exact
    reloaded = type(model).from_pretrained(directory)
    want = model.state_dict()
    assert list(reloaded.state_dict()) == list(want), "reloaded model has other state_dict keys"
    assert all(torch.equal(v, want[k]) for k, v in reloaded.state_dict().items()), "reloaded weights differ"


def input_groups(model: torch.nn.Module, inputs: dict) -> list[list[tuple[str, ...]]]:
    """Per distinct kind of block: its projections grouped by the tensor they read in a replay (the
    engine shares one statistic per group), in discovery order."""
    from pruning.engine import record_inputs

    adapter = get_adapter(model)
    batch = adapter.capture(model, inputs)
    h, kinds = batch.hidden, {}
    with torch.no_grad():
        for i in range(len(adapter.decoder_layers(model))):
            names = adapter.projections(model, i).names
            with record_inputs(adapter.named_linears(model, i, names)) as acts:
                h = adapter.replay(model, i, h, batch)
            groups: dict[int, list[str]] = {}
            for name in names:
                groups.setdefault(id(acts.get(name)), []).append(name)
            kinds.setdefault(names, [tuple(g) for g in groups.values()])
    return list(kinds.values())
