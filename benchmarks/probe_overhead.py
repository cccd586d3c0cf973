"""Cost of the MoT probe's routed forward and of its extra weights, as ratios measured in one run.

Times the original model, the unpruned probe and the probe with one path pruned (the worst case:
every routed projection splits its tokens between two copies) on the same batches, interleaving
the three to spread machine noise, and reports time ratios and the extra weight memory.

It measures at the probe study's evaluation batch (8 samples per forward) and at batch 1. With one
path pruned, each routed projection has to read two different weight matrices instead of one; at
batch 1 a forward carries only ~100 tokens, so on a CPU that extra weight traffic is a visible share
of the time, while at batch 8 it is spread over eight times as many tokens.

    python benchmarks/probe_overhead.py                       # random Qwen2-VL built in memory
    python benchmarks/probe_overhead.py --model DIR --calib calib.json --images DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from prune_speed import forward_time, load_inputs, portable


def measure(model, batches, repeats: int) -> dict:
    from mot_probe import attach_probe_
    from pruning import PruneConfig

    unpruned = copy.deepcopy(model)
    attach_probe_(unpruned)
    pruned = copy.deepcopy(model)
    probe = attach_probe_(pruned)
    probe.prune_path_("text", PruneConfig("magnitude", sparsity=0.5), progress=False)
    variants = {"original": model, "probe": unpruned, "probe_text_pruned": pruned}
    for m in variants.values():
        forward_time(m, batches[:1])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, m in variants.items():
            times[name].append(forward_time(m, batches))
    median = {k: statistics.median(v) for k, v in times.items()}
    routed_weights = sum(p.numel() for r in probe.routed_linears() for p in r.base_layer.parameters())
    return {
        "seconds": median,
        "ratio_probe": median["probe"] / median["original"],
        "ratio_probe_text_pruned": median["probe_text_pruned"] / median["original"],
        "extra_weights": probe.extra_parameters(),
        "routed_path_weights": routed_weights,
        "extra_over_one_path": probe.extra_parameters() / routed_weights,
        "visual_fraction": float(sum(int((b["input_ids"] == model.config.image_token_id).sum()) for b in batches)
                                 / sum(b["input_ids"].numel() for b in batches)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", choices=["qwen2_vl"], default=None)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1],
                        help="samples per forward; 8 is the probe study's evaluation batch, 1 the worst case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.model is None:
        args.synthetic = "qwen2_vl"
    torch.set_num_threads(args.threads)
    records = {}
    for size in args.batch_sizes:
        model, batches = load_inputs(argparse.Namespace(**vars(args), batch_size=size))
        record = records[size] = measure(model.eval(), batches, args.repeats)
        print(f"batch size {size} (visual tokens: {100 * record['visual_fraction']:.0f}%): forward time ratio "
              f"unpruned probe / original {record['ratio_probe']:.3f}, "
              f"text-pruned probe / original {record['ratio_probe_text_pruned']:.3f}")
    print(f"extra weights: {record['extra_weights']:,} = {record['extra_over_one_path']:.2f} x one path's "
          "routed Linears")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        setup = {k: portable(v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"setup": setup, "by_batch_size": records}, indent=2))


if __name__ == "__main__":
    main()
