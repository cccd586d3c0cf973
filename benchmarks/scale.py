"""Pruning at real width with offload: peak memory stays flat in depth, time grows linearly.

Synthetic LLaVA-style models of 7B width (Llama decoder: hidden 4096, intermediate 11008, 32 heads; a small
vocabulary and a small CLIP tower, since neither is pruned) are built at depths 2, 4 and 8, saved to disk,
then loaded with their decoder layers on disk and pruned with ATV through ``ExecutionConfig(offload=True)``
(what ``atv prune --offload`` does), each depth in its own process so each peak RSS is its own:

    nice python benchmarks/scale.py                      # depths 2 4 8, bf16, 4 samples
    nice python benchmarks/scale.py --depths 2 4 --dtype float32

Peak RSS is ``ru_maxrss`` minus the RSS after imports, over loading, pruning and saving (``peak_rss_prune_mb``:
up to the end of pruning); ``growth_vs_layer`` is the peak's growth over the smallest depth in units of one
decoder layer's weights (flat = well under 1). Wall seconds depend on the machine's load (recorded at the
start); the process's CPU seconds barely do, so the summary fits a line through prune CPU time over depth
(``summary.time``: seconds per layer, intercept, largest relative deviation of a point from the line).
The memory plan (:func:`pruning.memory.plan_memory`) of each run is recorded beside the measurement. Results go to
``benchmarks/results/scale.json`` (no machine paths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE_TOKEN = 1000  # above the text ids


def llava_config(depth: int, hidden: int = 4096, intermediate: int = 11008, heads: int = 32, dtype: str = "bfloat16"):
    """A LLaVA-1.5-style config: Llama decoder of the given width/depth, CLIP tower 224 px / patch 14 (256 tokens)."""
    from transformers import LlavaConfig

    text = dict(model_type="llama", vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=4096, pad_token_id=0)
    vision = dict(model_type="clip_vision_model", image_size=224, patch_size=14, hidden_size=256,
                  intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, projection_dim=256)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    config.dtype = dtype
    return config


def calibration(samples: int, text_tokens: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One sample per batch: 256 image tokens after a few text tokens, ``text_tokens`` text tokens in all."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(samples):
        text = torch.randint(1, 1000, (text_tokens,), generator=g)
        ids = torch.cat([text[:8], torch.full((256,), IMAGE_TOKEN), text[8:]]).unsqueeze(0)
        batches.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                            pixel_values=torch.randn(1, 3, 224, 224, generator=g)))
    return batches


def current_rss() -> int:
    """Resident set size of this process now, bytes (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds() -> float:
    """CPU time of this process (user + system, all threads): unlike wall time, other jobs on a shared
    machine barely change it, so it shows how the work grows with depth."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def linearity(records: list[dict]) -> dict:
    """Least-squares line through (depth, prune CPU seconds): per-layer slope, intercept and the largest
    relative deviation of a measured point from the line (0 = exactly linear)."""
    import numpy as np

    depth = np.array([r["depth"] for r in records], dtype=float)
    cpu = np.array([r["prune_cpu_seconds"] for r in records])
    slope, intercept = np.polyfit(depth, cpu, 1) if len(records) > 1 else (cpu[0] / depth[0], 0.0)
    deviation = np.abs(cpu - (slope * depth + intercept)) / cpu
    return {"cpu_seconds_per_layer": float(slope), "cpu_intercept_seconds": float(intercept),
            "max_relative_deviation": float(deviation.max())}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build(args: argparse.Namespace) -> dict:
    """Child: build the random model of ``args.depth`` layers in ``args.dtype`` and save it to ``args.dir``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, args.dtype))
    start = time.perf_counter()
    model = LlavaForConditionalGeneration(llava_config(args.depth, dtype=args.dtype)).eval()
    model.save_pretrained(args.dir, safe_serialization=True)
    return {"build_seconds": time.perf_counter() - start}


def prune(args: argparse.Namespace) -> dict:
    """Child: load the saved model with its decoder layers on disk, prune with ATV (offload), save."""
    from transformers import AutoConfig

    from pruning import ExecutionConfig, PruneConfig, prune_
    from pruning.io import LoadOptions, load_model, save_pruned
    from pruning.memory import plan_memory

    torch.set_num_threads(args.threads)
    baseline = current_rss()
    config, execution = PruneConfig("atv", sparsity=0.5), ExecutionConfig(offload=True)
    batches = calibration(args.nsamples, args.text_tokens)
    seq_len = int(batches[0]["input_ids"].shape[1])
    plan = plan_memory(config, execution, AutoConfig.from_pretrained(args.dir), args.nsamples, seq_len, 1, args.dtype)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".scale-offload-", dir=args.work) as folder:
        model, _ = load_model(args.dir, LoadOptions(dtype="auto"), with_processor=False, offload_folder=folder)
        loaded = time.perf_counter()
        cpu_start = cpu_seconds()
        report = prune_(model, config, batches, execution=execution, progress=False)
        prune_cpu = cpu_seconds() - cpu_start
        pruned_peak = peak_rss()
        save_pruned(model, None, report.to_dict(), Path(args.work) / "pruned")
    total = time.perf_counter() - start
    return {"depth": args.depth, "dtype": args.dtype, "samples": report.samples, "tokens_per_sample": seq_len,
            "load_seconds": loaded - start, "prune_seconds": report.seconds, "total_seconds": total,
            "seconds_per_layer": report.seconds / args.depth, "prune_cpu_seconds": prune_cpu,
            "cpu_seconds_per_layer": prune_cpu / args.depth, "baseline_rss_mb": baseline / 2**20,
            "peak_rss_prune_mb": (pruned_peak - baseline) / 2**20, "peak_rss_mb": (peak_rss() - baseline) / 2**20,
            "plan_mb": plan.peak() / 2**20, "plan": plan.to_dict(), "sparsity": report.sparsity}


def layer_bytes(hidden: int, intermediate: int, dtype: str) -> int:
    """Weights of one Llama decoder layer (4 attention + 3 MLP projections; norms ignored)."""
    size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    return (4 * hidden * hidden + 3 * hidden * intermediate) * size


def _child(mode: str, args: argparse.Namespace, depth: int, folder: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--depth", str(depth), "--dir", str(folder / "model"),
               "--work", str(folder), "--dtype", args.dtype, "--nsamples", str(args.nsamples),
               "--text-tokens", str(args.text_tokens), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} at depth {depth} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="bfloat16 when the CPU multiplies it fast (see --matmul-check)")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample (plus 256 image tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--child", choices=["build", "prune"], help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def matmul_gflops(dtype: torch.dtype, threads: int) -> float:
    """Throughput of a 7B-width MLP matmul (512 tokens x 4096 -> 11008) in ``dtype``."""
    torch.set_num_threads(threads)
    x, w = torch.randn(512, 4096, dtype=dtype), torch.randn(11008, 4096, dtype=dtype)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    return 3 * 2 * 512 * 4096 * 11008 / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(build(args) if args.child == "build" else prune(args)))
        return
    import transformers

    setup = {"depths": args.depths, "dtype": args.dtype, "nsamples": args.nsamples, "text_tokens": args.text_tokens,
             "image_tokens": 256, "threads": args.threads, "method": "atv", "offload": True,
             "torch": torch.__version__, "transformers": transformers.__version__, "cpus": os.cpu_count(),
             "machine": platform.machine(), "load_average_at_start": os.getloadavg(),
             "matmul_gflops": {"float32": matmul_gflops(torch.float32, args.threads),
                               "bfloat16": matmul_gflops(torch.bfloat16, args.threads)},
             "layer_mb": layer_bytes(4096, 11008, args.dtype) / 2**20, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    records = []
    for depth in args.depths:
        folder = Path(tempfile.mkdtemp(prefix=f"scale-{depth}-", dir=args.work))
        try:
            built = _child("build", args, depth, folder)
            record = {**_child("prune", args, depth, folder), **built}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        records.append(record)
        base = records[0]
        record["growth_vs_layer"] = (record["peak_rss_mb"] - base["peak_rss_mb"]) / setup["layer_mb"]
        print(f"depth {depth:2d}  prune {record['prune_seconds']:7.1f}s ({record['seconds_per_layer']:5.1f}s/layer, "
              f"CPU {record['cpu_seconds_per_layer']:5.1f}s/layer)  "
              f"peak RSS {record['peak_rss_mb']:7.0f} MB (prune only {record['peak_rss_prune_mb']:7.0f})  "
              f"plan {record['plan_mb']:7.0f} MB  growth {record['growth_vs_layer']:+.2f} layers", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"time": linearity(records)}  # partial results survive a later failure
        args.out.write_text(json.dumps({"setup": setup, "results": records, "summary": summary}, indent=2))
    line = summary["time"]
    print(f"prune CPU time ~ {line['cpu_intercept_seconds']:.1f} s + {line['cpu_seconds_per_layer']:.1f} s x depth "
          f"(largest deviation from the line {100 * line['max_relative_deviation']:.1f}%)")
    print(f"written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out.name}")


if __name__ == "__main__":
    main()
