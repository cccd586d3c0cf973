"""The same tiny model pruned, probed and evaluated on CUDA and on the CPU gives the same answers.

Marked ``gpu``: skipped without CUDA (see conftest.py); ``benchmarks/gpu_check.sh`` runs them on a GPU box.
Floating-point sums differ between devices, so masks are compared by agreement (>= 99.9%) and outputs with
``allclose``; everything else (which Linears, how many pruned per row) must match exactly.
"""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny
from tiny_processors import make_processor

from evaluation import load_benchmark, score_choice
from mot_probe import attach_probe_
from pruning import ExecutionConfig, PruneConfig
from pruning.engine import compute_masks
from pruning.memory import available_memory

pytestmark = pytest.mark.gpu
AGREEMENT = 0.999


def _cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _to(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    same = sum(int((a[k] == b[k].cpu()).sum()) for k in a)
    return same / sum(m.numel() for m in a.values())


@pytest.mark.parametrize("method", ["wanda", "atv"])
@pytest.mark.parametrize("offload", [False, True])
def test_masks_on_cuda_agree_with_cpu(method, offload):
    model, inputs = build_tiny("llava", batch=2)
    config = PruneConfig(method, sparsity=0.5)
    cpu = compute_masks(model, config, [inputs], progress=False)
    if offload:  # the model stays on the CPU; each decoder layer runs on the GPU in turn
        execution = ExecutionConfig(offload=True, execution_device=str(_cuda()))
        gpu = compute_masks(model, config, [inputs], execution=execution, progress=False)
    else:
        gpu = compute_masks(copy.deepcopy(model).to(_cuda()), config, [_to(inputs, _cuda())], progress=False)
    assert _agreement(cpu.masks, gpu.masks) >= AGREEMENT
    for name, mask in gpu.masks.items():  # exact count per row whatever the device
        assert torch.equal(mask.sum(dim=1), cpu.masks[name].sum(dim=1))


def test_probe_forward_on_cuda_matches_cpu():
    model, inputs = build_tiny("llava")
    gpu_model = copy.deepcopy(model).to(_cuda())
    outputs = []
    for m, batch in ((model, inputs), (gpu_model, _to(inputs, _cuda()))):
        probe = attach_probe_(m)
        probe.prune_path_("text", PruneConfig("magnitude", sparsity=0.5), progress=False)  # same masks anywhere
        with torch.no_grad():
            outputs.append(m(**batch).logits.float().cpu())
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)


def test_choice_scores_on_cuda_match_cpu(tmp_path):
    model, _ = build_tiny("llava")
    processor = make_processor("llava", model)
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    records = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "question": "what is shown",
                        "options": ["one", "red cat", "two"], "answer": "two"})
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    bench = load_benchmark(path)
    cpu = score_choice(model, processor, bench, progress=False)
    gpu = score_choice(copy.deepcopy(model).to(_cuda()), processor, bench, progress=False)
    cpu_scores = [item.details["logprobs"] for item in cpu.items]
    gpu_scores = [item.details["logprobs"] for item in gpu.items]
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4, rtol=1e-4)


def test_free_memory_on_cuda_is_known():
    free = available_memory(_cuda())
    assert free is not None and 0 < free <= torch.cuda.get_device_properties(_cuda()).total_memory
