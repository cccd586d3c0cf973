"""Time of the sensitivity map (``atv probe --map``) on the embedded default model, by its parts.

A full map on smol-llava is 121 cells (dense + 30 layers x 2 pathways x 2 groups); each cell is one
evaluation of the prompts, and each layer one ``compute_masks`` shared by its four cells. This script
times, in one process, the dense reference, one cell's evaluation, and the masks of a few layers, and
extrapolates the whole map (masks interpolated linearly in the layer index: their cost is the replay up to
the layer). ``--full`` also runs the whole map and reports its wall time. The machine's load average is
recorded before and after: on shared machines the wall times follow the load.

    python benchmarks/map_speed.py --nsamples 32 --items 32 [--full]
"""

from __future__ import annotations

import argparse
import json
import os
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
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also run the whole map")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "map_speed_smol_llava.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from prune_speed import default_model_inputs

    from atv.experiments.sensitivity_map import LayerMasks, MapConfig, run_map_study
    from evaluation import load_benchmark
    from evaluation.prompt_fidelity import answer_prompts, prompt_fidelity, prompt_reference
    from mot_probe.surgery import attach_probe_
    from pruning.data import load_llava_conversations
    from pruning.io import LoadOptions, load_model

    load_start = os.getloadavg()
    model_dir, calib, images = default_model_inputs(args.cache)
    model, processor = load_model(str(model_dir), LoadOptions(dtype="float32"), with_processor=True)
    batches, _ = load_llava_conversations(calib, images, processor, args.nsamples, 0)
    benches = [load_benchmark(images / f"{name}.jsonl") for name in IMAGE_BENCHES]
    prompts = answer_prompts(benches, args.items, 0)
    config = MapConfig(map_items=args.items)
    probe = attach_probe_(model)
    reference, ref_wall, ref_cpu = _timed(lambda: prompt_reference(model, processor, prompts))
    _, eval_wall, eval_cpu = _timed(lambda: prompt_fidelity(model, processor, prompts, reference))
    n_layers = len(probe.routed)
    probe_layers = sorted({0, n_layers // 2, n_layers - 1})
    masks = {}
    for layer in probe_layers:
        shared = LayerMasks(model, probe, batches, config)
        _, wall, cpu = _timed(lambda layer=layer, shared=shared: shared.prune_(
            {"layer": layer, "pathway": "text", "group": "ffn"}))
        probe.reset_()
        masks[layer] = {"wall": wall, "cpu": cpu}
    probe.unload()
    mean_masks_wall = sum(m["wall"] for m in masks.values()) / len(masks)  # ~ the mean over layers (linear in l)
    cells = 1 + n_layers * 4
    estimate = ref_wall + cells * eval_wall + n_layers * mean_masks_wall
    result = {"model": "smol-llava", "layers": n_layers, "cells": cells, "nsamples": args.nsamples,
              "prompts": args.items, "threads": args.threads,
              "reference_s": {"wall": ref_wall, "cpu": ref_cpu}, "cell_eval_s": {"wall": eval_wall, "cpu": eval_cpu},
              "layer_masks_s": {str(k): v for k, v in masks.items()},
              "estimated_map_wall_s": estimate, "estimated_cells_per_min": 60 * cells / estimate}
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            model, processor = load_model(str(model_dir), LoadOptions(dtype="float32"), with_processor=True)
            full, wall, cpu = _timed(lambda: run_map_study(model, processor, batches, benches, Path(tmp) / "map",
                                                           config, progress=False))
            result["full_map_s"] = {"wall": wall, "cpu": cpu, "cells_per_min": 60 * full.computed / wall}
    result["load_average"] = {"start": load_start, "end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
