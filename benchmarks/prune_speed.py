"""Pruning time and peak memory of each method, as ratios to one dense forward over the calibration set.

Every (method, offload) variant runs in its own subprocess, so its peak RSS is its own. The child
times T_fwd (one dense forward of the whole model over every calibration batch) right before and
right after pruning and divides the pruning time by their mean: machines here are shared and noisy,
so only ratios measured within one process are reported. No test asserts on time.

    python benchmarks/prune_speed.py --synthetic qwen2_vl            # random Qwen2-VL built in memory
    python benchmarks/prune_speed.py --default-model --nsamples 32   # smol-llava + the offline suite's calib.json
    python benchmarks/prune_speed.py --model DIR --calib calib.json --images DIR --offload-methods wanda atv

Offload variants (folder models only) load the decoder layers memory-mapped from the checkpoint and
prune one layer at a time (``ExecutionConfig(offload=True)``); compare their peak RSS with the plain run.
Results go to ``benchmarks/results/prune_speed_<name>.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
METHODS = ("magnitude", "wanda", "atv", "sparsegpt", "tamp")


WIDTHS = {  # --width: the decoder's (hidden, intermediate, heads, key/value heads)
    "small": (256, 1024, 8, 4),
    "7b": (3584, 18944, 28, 4),  # Qwen2-VL-7B's text width
}


def synthetic_qwen2_vl(seed: int = 0, samples: int = 8, hidden: int = 256, layers: int = 4, batch_size: int = 1,
                       intermediate: int | None = None, heads: int = 8, kv_heads: int = 4):
    """A random Qwen2-VL of moderate size and calibration batches of ``batch_size`` samples with ~200
    visual tokens each (all samples have the same length, so no padding)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    half = hidden // heads // 2  # mrope splits half a head's dimensions 2:3:3 over (time, height, width)
    mrope = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0}),
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
    groups = [batches[i:i + batch_size] for i in range(0, samples, batch_size)]
    return model, [{key: torch.cat([b[key] for b in group]) for key in group[0]} for group in groups]


def default_model_inputs(cache: Path | None) -> tuple[Path, Path, Path]:
    """(model folder, calib.json, image folder) of the embedded default model and the offline suite."""
    from atv.default_model import build_default_model, cache_root
    from atv.suite import write_suite

    model_dir = build_default_model(cache, progress=False)
    suite = cache_root(cache) / "prune-speed-suite"
    if not (suite / "calib.json").is_file():
        write_suite(suite, seed=0, quick=True, overwrite=True)
    return model_dir, suite / "calib.json", suite


def load_inputs(args: argparse.Namespace, offload_folder: str | None = None):
    if args.synthetic:
        hidden, intermediate, heads, kv_heads = WIDTHS[getattr(args, "width", "small")]
        model, batches = synthetic_qwen2_vl(samples=args.nsamples, batch_size=getattr(args, "batch_size", 1),
                                            hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                                            layers=getattr(args, "layers", 4))
        device, dtype = torch.device(getattr(args, "device", "cpu")), getattr(torch, getattr(args, "dtype", "float32"))
        move = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
        return model.to(device, dtype), [{k: move(v) for k, v in b.items()} for b in batches]
    from pruning.data import load_llava_conversations
    from pruning.io import load_model

    model, processor = load_model(args.model, getattr(args, "dtype", "float32"), offload_folder=offload_folder)
    batches, _ = load_llava_conversations(args.calib, args.images, processor, args.nsamples, args.seed,
                                          batch_size=getattr(args, "batch_size", 1))
    return model, batches


def synchronize(model) -> None:
    """Wait for the model's device (asynchronous backends such as CUDA) before reading a clock."""
    device = next(model.parameters()).device
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type != "cpu" and sync is not None:
        sync(device)


def forward_time(model, batches) -> float:
    synchronize(model)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    synchronize(model)
    return time.perf_counter() - start


def run_one(args: argparse.Namespace) -> dict:
    """In a child process: T_fwd, prune with one method, T_fwd again (on the pruned model: same cost)."""
    from pruning import ExecutionConfig, PruneConfig, prune_

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="prune-speed-offload-") as folder:
        model, batches = load_inputs(args, folder if args.offload else None)
        forward_time(model, batches[:1])  # warm-up
        before = forward_time(model, batches)
        extra = {"schedule": args.schedule} if args.method == "atv" else {}
        report = prune_(model, PruneConfig(args.method, sparsity=0.5), batches,
                        execution=ExecutionConfig(offload=args.offload, **extra), progress=False)
        after = forward_time(model, batches)
        device = next(model.parameters()).device
        backend = getattr(torch, device.type, None)
        device_peak = backend.max_memory_allocated(device) / 2**20 if device.type != "cpu" else None
    t_fwd = (before + after) / 2
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": args.method, "offload": args.offload, "t_fwd": t_fwd, "t_fwd_before": before,
            "t_fwd_after": after, "t_prune": report.seconds, "ratio": report.seconds / t_fwd, "peak_rss_mb": peak_mb,
            "device": str(device), "peak_device_mb": device_peak,
            "samples": report.samples, "tokens": sum(int(b["input_ids"].numel()) for b in batches),
            "sparsity": report.sparsity}


def _variants(args: argparse.Namespace) -> list[tuple[str, bool]]:
    offloaded = [] if args.synthetic else args.offload_methods
    return [(m, False) for m in args.methods] + [(m, True) for m in offloaded]


def _child(args: argparse.Namespace, method: str, offload: bool) -> dict:
    command = [sys.executable, __file__, "--child-method", method, "--nsamples", str(args.nsamples),
               "--seed", str(args.seed), "--threads", str(args.threads), "--schedule", args.schedule,
               "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device,
               "--width", args.width, "--layers", str(args.layers)]
    command += ["--synthetic", args.synthetic] if args.synthetic else [
        "--model", str(args.model), "--calib", str(args.calib), "--images", str(args.images)]
    command += ["--offload"] if offload else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} (offload={offload}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def portable(value) -> str:
    """An option's value for a results file: paths relative to the repository, or just their name when
    outside it (results never record a machine's folders)."""
    if not isinstance(value, Path):
        return str(value)
    path = value.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _setup(args: argparse.Namespace) -> dict:
    import transformers

    return {**{k: portable(v) for k, v in vars(args).items() if k not in ("child_method",)},
            "torch": torch.__version__, "transformers": transformers.__version__, "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(), "machine": platform.machine(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", choices=["qwen2_vl"], help="a random model built in memory")
    parser.add_argument("--default-model", action="store_true",
                        help="the embedded smol-llava and the suite's calib.json")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder of the default model ($ATV_CACHE)")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="--synthetic: where the model runs (e.g. cuda:0)")
    parser.add_argument("--width", default="small", choices=list(WIDTHS), help="--synthetic: decoder width")
    parser.add_argument("--layers", type=int, default=4, help="--synthetic: decoder layers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the steadiest on a shared machine)")
    parser.add_argument("--schedule", default="auto")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--offload-methods", nargs="*", default=["wanda", "atv"],
                        help="methods also run with --offload (folder models only)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child-method", help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_method:
        args.method = args.child_method
        print(json.dumps(run_one(args)))
        return
    if args.default_model:
        args.model, args.calib, args.images = default_model_inputs(args.cache)
    if not args.synthetic and args.model is None:
        raise SystemExit("give --synthetic qwen2_vl, --default-model, or --model DIR --calib FILE --images DIR")
    name = args.synthetic or ("smol_llava" if args.default_model else Path(args.model).name)
    out = args.out or ROOT / "benchmarks" / "results" / f"prune_speed_{name}.json"
    setup, records = _setup(args), []
    for method, offload in _variants(args):
        record = _child(args, method, offload)
        records.append(record)
        print(f"{method:10s}{' offload' if offload else '        '}  T_fwd {record['t_fwd']:7.2f}s  "
              f"prune {record['t_prune']:7.2f}s  ratio {record['ratio']:5.2f}  "
              f"peak RSS {record['peak_rss_mb']:6.0f} MB", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"setup": setup, "results": records}, indent=2))  # partial results survive
    print(f"written to {portable(out)}")


if __name__ == "__main__":
    main()
