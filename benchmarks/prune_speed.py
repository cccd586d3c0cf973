"""Pruning time and peak memory of each method, as ratios to one dense forward over the calibration set.

Each method runs in its own subprocess (so peak RSS is its own) which measures, in the same run,
T_fwd (one dense forward of the whole model over every calibration batch) and the pruning time.
Ratios are reported because machines here are noisy; no test asserts on time.

    python benchmarks/prune_speed.py --synthetic qwen2_vl --out benchmarks/results/qwen2_vl.json
    python benchmarks/prune_speed.py --model ~/.cache/atv-toolkit/smol-llava --calib calib.json --images DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ("magnitude", "wanda", "atv", "sparsegpt", "tamp")


def synthetic_qwen2_vl(seed: int = 0, samples: int = 8, hidden: int = 256, layers: int = 4):
    """A random Qwen2-VL of moderate size and calibration batches with ~200 visual tokens each."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=4, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903)
    model = Qwen2VLForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    grid = (1, 28, 28)  # 784 patches -> 196 merged visual tokens
    n_visual = grid[1] * grid[2] // 4
    batches = []
    for _ in range(samples):
        text = torch.randint(0, 899, (60,), generator=g)
        ids = torch.cat([text[:10], torch.tensor([902]), torch.full((n_visual,), 900), torch.tensor([903]), text[10:]])
        ids = ids.unsqueeze(0)
        patches = grid[1] * grid[2]
        pixel_values = torch.randn(patches, 3 * 2 * 4 * 4, generator=g)
        batches.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                            image_grid_thw=torch.tensor([grid]), mm_token_type_ids=(ids == 900).long()))
    return model, batches


def _load(args: argparse.Namespace):
    if args.synthetic:
        return synthetic_qwen2_vl(samples=args.nsamples)
    from pruning.data import load_llava_conversations
    from pruning.io import load_model

    model, processor = load_model(args.model)
    batches, _ = load_llava_conversations(args.calib, args.images, processor, args.nsamples, args.seed)
    return model, batches


def _forward_time(model, batches) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    return time.perf_counter() - start


def run_one(args: argparse.Namespace) -> dict:
    """In a child process: T_fwd, then prune with one method."""
    from pruning import PruneConfig, prune_

    torch.set_num_threads(args.threads)
    model, batches = _load(args)
    _forward_time(model, batches[:1])  # warm-up
    t_fwd = _forward_time(model, batches)
    extra = {"schedule": args.schedule} if args.method in ("atv",) else {}
    report = prune_(model, PruneConfig(args.method, sparsity=0.5, **extra), batches, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": args.method, "t_fwd": t_fwd, "t_prune": report.seconds, "ratio": report.seconds / t_fwd,
            "peak_rss_mb": peak_mb, "samples": report.samples, "sparsity": report.sparsity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", choices=["qwen2_vl"], help="a random model built in memory")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schedule", default="auto")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    records = []
    for method in args.methods:
        child = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        record = json.loads(done.stdout.strip().splitlines()[-1])
        records.append(record)
        print(f"{method:10s} T_fwd {record['t_fwd']:7.2f}s  prune {record['t_prune']:7.2f}s  "
              f"ratio {record['ratio']:5.2f}  peak RSS {record['peak_rss_mb']:7.0f} MB", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"setup": {k: str(v) for k, v in vars(args).items()}, "results": records},
                                       indent=2))


if __name__ == "__main__":
    main()
