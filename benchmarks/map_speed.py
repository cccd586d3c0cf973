"""Time of the sensitivity map (``atv probe --map``) on the embedded default model, by its parts.

A full map on smol-llava is 121 cells (dense + 30 layers x 2 pathways x 2 groups). Its parts: one dense pass
over the prompts that keeps every decoder layer's inputs (and gives the reference), one dense pass over the
calibration batches that gives every layer's masks, and per cell a replay of the prompts from the cell's layer
on. This script times those parts in one process (a cell at the first, middle and last layer, and, for
comparison, one cell scored by full forwards as before), extrapolates the whole map (cell cost interpolated
linearly in the layer index: it is the replay of the layers from it on), and with ``--full`` runs the whole map.
Wall and CPU time are both recorded, with the load average before and after: on a shared machine the wall time
follows the load, the CPU time much less.

    python benchmarks/map_speed.py --nsamples 32 --items 32 --threads 2 [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

IMAGE_BENCHES = ("digit", "scene-colour", "scene-shape", "scene-position", "scene-count", "digit-compare", "digit-plus")


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall": round(time.perf_counter() - wall, 2), "cpu": round(time.process_time() - cpu, 2)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _interpolated(measured: dict[int, float], layer: int) -> float:
    """Piecewise-linear in the layer index between the measured layers."""
    points = sorted(measured)
    for lo, hi in zip(points, points[1:]):
        if lo <= layer <= hi:
            return measured[lo] + (measured[hi] - measured[lo]) * (layer - lo) / (hi - lo)
    return measured[points[-1]]


def parts(model, processor, batches, prompts, config) -> dict:
    """The map's parts, timed: prompt states, the masks pass, and a cell at the first, middle and last layer."""
    from atv.experiments.sensitivity_map import LayerMasks
    from evaluation.prompt_fidelity import prompt_fidelity, prompt_states, replayed_fidelity
    from mot_probe.surgery import attach_probe_

    probe = attach_probe_(model)
    try:
        (states, reference), states_s = _timed(lambda: prompt_states(model, processor, prompts,
                                                                      batch_size=config.batch_size))
        n_layers = len(probe.routed)
        masks = LayerMasks(model, probe, batches, config)
        _, masks_s = _timed(lambda: masks.prune_({"layer": 0, "pathway": "text", "group": "ffn"}))
        mask_bytes = sum(m.numel() * m.element_size() for layer in masks.masks.values() for m in layer.values())
        cells = {}
        for layer in sorted({0, n_layers // 2, n_layers - 1}):
            probe.reset_()
            masks.prune_({"layer": layer, "pathway": "text", "group": "ffn"})
            _, cells[layer] = _timed(lambda layer=layer: replayed_fidelity(model, states, reference, layer))
        _, full_forward_s = _timed(lambda: prompt_fidelity(model, processor, prompts, reference,
                                                           batch_size=config.batch_size))
    finally:
        probe.unload()
    out = {"layers": n_layers, "prompt_tokens": {
        "real": sum(int(b.captured.valid.sum()) for b in states.batches),
        "padded": sum(b.captured.valid.numel() for b in states.batches),
        "scored": sum(int(b.scored.numel()) for b in states.batches)},
        "prompt_states_s": states_s, "prompt_states_mb": round(states.nbytes / 2**20, 1),
           "masks_pass_s": masks_s, "masks_mb": round(mask_bytes / 2**20, 1),
           "cell_replayed_s": {str(k): v for k, v in cells.items()},
           "cell_full_forwards_s": {"layer": n_layers - 1, **full_forward_s}}
    for clock in ("wall", "cpu"):
        per_layer = {k: v[clock] for k, v in cells.items()}
        total = states_s[clock] + masks_s[clock] + per_layer[0]  # the dense cell replays from layer 0
        total += sum(4 * _interpolated(per_layer, layer) for layer in range(n_layers))
        out[f"estimated_map_{clock}_s"] = round(total, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also run the whole map")
    parser.add_argument("--skip-parts", action="store_true", help="with --full: only the whole map")
    parser.add_argument("--keep", type=Path, default=None, help="with --full: run the map in this folder, kept")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "map_speed_smol_llava.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from prune_speed import default_model_inputs

    from atv.experiments.sensitivity_map import MapConfig, run_map_study
    from evaluation import load_benchmark
    from evaluation.prompt_fidelity import answer_prompts
    from pruning.data import load_llava_conversations
    from pruning.io import LoadOptions, load_model

    result = {"model": "smol-llava", "nsamples": args.nsamples, "prompts": args.items, "threads": args.threads,
              "cores": os.cpu_count(), "torch": torch.__version__, "load_average_start": _load()}
    model_dir, calib, images = default_model_inputs(args.cache)
    model, processor = load_model(str(model_dir), LoadOptions(dtype="float32"), with_processor=True)
    batches, _ = load_llava_conversations(calib, images, processor, args.nsamples, 0)
    benches = [load_benchmark(images / f"{name}.jsonl") for name in IMAGE_BENCHES]
    prompts = answer_prompts(benches, args.items, 0)
    config = MapConfig(map_items=args.items)
    result["calibration_tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    if not args.skip_parts:
        result["parts"] = parts(model, processor, batches, prompts, config)
        result["load_average_after_parts"] = _load()
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.keep or Path(tmp) / "map"
            full, clock = _timed(lambda: run_map_study(model, processor, batches, benches, folder, config,
                                                       progress=False))
            result["full_map"] = {**clock, "cells": full.computed,
                                  "cells_per_min": round(60 * full.computed / clock["wall"], 1),
                                  "load_average_end": _load()}
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
