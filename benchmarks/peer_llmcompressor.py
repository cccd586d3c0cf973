"""The toolkit next to llm-compressor (its Wanda and SparseGPT modifiers) on the same model and inputs, in one process.

For each pipeline (``basic``: every layer's statistics from the dense model, the toolkit's ``propagate='dense'``;
``sequential``: each layer calibrated on the outputs of the pruned layers before it, the toolkit's default) and each
method (Wanda, SparseGPT, 2:4 Wanda; the toolkit's 2:4 ATV is timed against llm-compressor's 2:4 Wanda), both prune a
freshly loaded copy of the model at sparsity 0.5; the script reports each time as a multiple of T_fwd (one dense
forward of the whole model over the calibration samples, measured in the same process before every repetition),
the speed-up (llm-compressor's time / the toolkit's), and the mask agreement (the fraction of decoder weights that
both leave zero or both keep). Repetitions alternate which side runs first; times are medians. One torch thread.
No test asserts on time, and nothing of llm-compressor is a dependency of the toolkit.

Environment (llm-compressor 0.14 wants transformers <= 5.17 and would pull a CUDA torch; this keeps the CPU one)::

    python3 -m venv /work/venv-peer
    /work/venv-peer/bin/pip install torch==2.13.0            # the CPU build (a local wheel, or
    #   --index-url https://download.pytorch.org/whl/cpu); install it first
    echo "torch==2.13.0" > /tmp/peer-constraints.txt      # pip may not replace it
    /work/venv-peer/bin/pip install -c /tmp/peer-constraints.txt llmcompressor==0.14.0.1 transformers==5.17.0
    # the toolkit itself is read from this checkout (sys.path); its own dependencies are in that venv already

Run (the default model is built once into $ATV_CACHE by the toolkit's own environment, ``atv default-model build``)::

    /work/venv-peer/bin/python benchmarks/peer_llmcompressor.py --nsamples 8 \\
        --out benchmarks/results/peer_llmcompressor.md

Without llm-compressor installed the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PIPELINES = ("basic", "sequential")
METHODS = {  # name -> (toolkit PruneConfig keywords, llm-compressor modifier and its mask structure)
    "wanda": (dict(method="wanda"), ("wanda", "0:0")),
    "sparsegpt": (dict(method="sparsegpt"), ("sparsegpt", "0:0")),
    "wanda 2:4": (dict(method="wanda", pattern="2:4"), ("wanda", "2:4")),
    "atv 2:4": (dict(method="atv", pattern="2:4"), ("wanda", "2:4")),  # timed against llm-compressor's 2:4 Wanda
}
SPARSITY = 0.5


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears inside the decoder layers (what both sides prune), by their full name."""
    from pruning.adapters import get_adapter

    layers = get_adapter(model).decoder_layers(model)
    return {f"{i}.{name}": module for i, layer in enumerate(layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: linear.weight.detach() == 0 for name, linear in decoder_linears(model).items()}


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].numel() for k in a)


def run_toolkit(model: nn.Module, batches: list, method: str, pipeline: str, args) -> float:
    from pruning import PruneConfig, prune_

    propagate = "dense" if pipeline == "basic" else "pruned"
    config = PruneConfig(**METHODS[method][0], sparsity=SPARSITY, propagate=propagate)
    start = time.perf_counter()
    prune_(model, config, batches, progress=False)
    return time.perf_counter() - start


def run_peer(model: nn.Module, processor, batches: list, method: str, pipeline: str, args) -> float:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader

    from pruning.adapters import get_adapter

    kind, structure = METHODS[method][1]
    layer_class = type(get_adapter(model).decoder_layers(model)[0]).__name__  # e.g. LlamaDecoderLayer
    common = dict(sparsity=SPARSITY, mask_structure=structure, targets=[layer_class])
    modifier = (SparseGPTModifier(**common, block_size=128, dampening_frac=0.01) if kind == "sparsegpt"
                else WandaPruningModifier(**common))
    loader = DataLoader(batches, batch_size=None)  # the toolkit's batches as they are
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        oneshot(model=model, processor=processor, dataset=loader, recipe=modifier, pipeline=pipeline,
                num_calibration_samples=len(batches), sequential_targets=[layer_class], output_dir=None,
                log_dir=None)
    return time.perf_counter() - start


def measure(args) -> list[dict]:
    from prune_speed import forward_time

    from pruning.data import load_llava_conversations
    from pruning.io import load_model

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model, "float32")
    fresh = lambda: load_model(args.model, "float32", with_processor=False)[0]  # noqa: E731  one copy per run
    batches, _ = load_llava_conversations(args.calib, args.images, processor, args.nsamples, args.seed)
    forward_time(model, batches[:1])  # warm-up
    rows = {}
    for rep in range(args.repeats):
        for pipeline in args.pipelines:
            peer_done: dict[tuple, tuple[float, dict] | str] = {}
            for method in args.methods:
                model = fresh()
                t_fwd = forward_time(model, batches)
                row = rows.setdefault((pipeline, method), {"pipeline": pipeline, "method": method, "t_fwd": [],
                                                           "toolkit": [], "peer": [], "agreement": None,
                                                           "peer_error": None})
                row["t_fwd"].append(t_fwd)
                peer_key = METHODS[method][1]
                order = ("toolkit", "peer") if rep % 2 == 0 else ("peer", "toolkit")
                masks = {}
                for side in order:
                    if side == "toolkit":
                        model = fresh()
                        row["toolkit"].append(run_toolkit(model, batches, method, pipeline, args))
                        masks["toolkit"] = zero_masks(model)
                    elif peer_key in peer_done:  # atv 2:4 is timed against the 2:4 Wanda run of this repetition
                        done = peer_done[peer_key]
                        if isinstance(done, str):
                            row["peer_error"] = done
                        else:
                            row["peer"].append(done[0])
                            masks["peer"] = done[1]
                    else:
                        model = fresh()
                        try:
                            seconds = run_peer(model, processor, batches, method, pipeline, args)
                        except Exception as error:  # a peer that cannot run here is reported, not hidden
                            peer_done[peer_key] = row["peer_error"] = f"{type(error).__name__}: {error}"[:300]
                            continue
                        masks["peer"] = zero_masks(model)
                        peer_done[peer_key] = (seconds, masks["peer"])
                        row["peer"].append(seconds)
                if "peer" in masks and row["agreement"] is None:
                    row["agreement"] = agreement(masks["toolkit"], masks["peer"])
                print(json.dumps({k: row[k] for k in ("pipeline", "method", "t_fwd", "toolkit", "peer",
                                                      "agreement", "peer_error")}), flush=True)
    return list(rows.values())


def table(rows: list[dict], nsamples: int) -> str:
    """Times as multiples of T_fwd, the median of every T_fwd of the run (one forward is a short, noisy
    measurement; each row's own T_fwd stays in the raw JSON)."""
    t_fwd = statistics.median([t for row in rows for t in row["t_fwd"]])
    lines = [f"T_fwd (one dense forward over the {nsamples} calibration samples): {t_fwd:.2f} s", "",
             "| samples | pipeline | method | toolkit (x T_fwd) | llm-compressor (x T_fwd) | "
             "speed-up (llm-compressor / toolkit) | mask agreement |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        toolkit = statistics.median(row["toolkit"]) / t_fwd
        if row["peer"]:
            peer = statistics.median(row["peer"]) / t_fwd
            peer_cells = f"{peer:.2f} | {peer / toolkit:.2f}x"
        else:
            peer_cells = f"failed: {row['peer_error']} | -"
        agree = ("- (other statistics)" if row["method"].startswith("atv") or row["agreement"] is None
                 else f"{100 * row['agreement']:.5f}%")
        lines.append(f"| {nsamples} | {row['pipeline']} | {row['method']} | {toolkit:.2f} | {peer_cells} | {agree} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: the embedded smol-llava)")
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="cache folder of the default model ($ATV_CACHE)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, help="append the table (markdown) here; the raw times go to <out>.json")
    parser.add_argument("--render", type=Path, help="print the tables of a raw <out>.json again, measure nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        for run in json.loads(args.render.read_text()):
            print(f"{table(run['rows'], run['nsamples'])}\n\n{run['setup']}\n")
        return
    try:
        import llmcompressor
    except ImportError:
        print("llm-compressor is not installed here; see this script's docstring for the environment. Skipped.")
        return
    if args.model is None:
        from prune_speed import default_model_inputs

        args.model, args.calib, args.images = default_model_inputs(args.cache)
    rows = measure(args)
    import transformers

    setup = (f"llm-compressor {llmcompressor.__version__}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, {args.threads} thread(s), {args.repeats} repetition(s), medians; "
             f"{os.cpu_count()} CPUs, load average at the end {tuple(round(x, 1) for x in os.getloadavg())}; "
             f"{time.strftime('%Y-%m-%d %H:%M')}")
    text = f"{table(rows, args.nsamples)}\n\n{setup}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(f"\n{text}")
        raw = args.out.with_suffix(".json")
        previous = json.loads(raw.read_text()) if raw.is_file() else []
        raw.write_text(json.dumps(previous + [{"setup": setup, "nsamples": args.nsamples, "rows": rows}], indent=1))


if __name__ == "__main__":
    main()
