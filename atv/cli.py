"""The ``atv`` command: parse arguments, call one library function, print its report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pruning.errors import ToolkitError


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model's shared weights and save it")
    p.add_argument("--model", type=Path, required=True, help="HF model folder (with processor)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the pruned model")
    p.add_argument("--method", default="atv", help="magnitude | wanda | atv | sparsegpt | tamp (default atv)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction pruned per row (default 0.5)")
    p.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4")
    p.add_argument("--pool", default=None, help="calibration pool: all | text | visual | atv | random-visual | tamp")
    p.add_argument("--alpha", type=float, default=1.0, help="ATV alpha rule (default 1)")
    p.add_argument("--visual-ratio", type=float, default=None, help="ATV fixed ratio of visual tokens instead of alpha")
    p.add_argument("--calib", type=Path, help="LLaVA-conversation JSON/JSONL")
    p.add_argument("--images", type=Path, help="image folder of the calibration records")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None, help="skip calibration records longer than this")
    p.add_argument("--batch-size", type=int, default=1, help="calibration samples per forward (padding-aware)")
    p.add_argument("--targets", nargs="+", default=None, help="Linears to prune, relative to each block")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: where the model loads)")
    p.add_argument("--propagate", default="pruned", choices=["pruned", "dense"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--offload", action="store_true",
                   help="keep decoder layers on disk and load one at a time (memory bounded by one layer)")
    p.set_defaults(func=_prune)


def _prune(args: argparse.Namespace) -> int:
    from pruning.config import PruneConfig
    from pruning.execution import ExecutionConfig
    from pruning.run import PruneJob, run_prune_job

    extra = {"targets": tuple(args.targets)} if args.targets else {}
    config = PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, pool=args.pool,
                         alpha=args.alpha, visual_ratio=args.visual_ratio, propagate=args.propagate,
                         seed=args.seed, **extra)
    job = PruneJob(model=args.model, out=args.out, config=config, calib=args.calib, images=args.images,
                   nsamples=args.nsamples, seed=args.seed, max_length=args.max_length,
                   batch_size=args.batch_size, dtype=args.dtype,
                   device=args.device, overwrite=args.overwrite,
                   execution=ExecutionConfig(offload=args.offload))
    report = run_prune_job(job)
    print(json.dumps({"out": str(args.out), "mean_sparsity": round(report.sparsity, 6),
                      "layers": len(report.layers), "seconds": round(report.seconds, 2)}, indent=2))
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="MoT sensitivity study: prune one pathway with one calibration pool, evaluate")
    p.add_argument("--model", type=Path, required=True, help="HF model folder (with processor)")
    p.add_argument("--calib", type=Path, required=True, help="LLaVA-conversation JSON/JSONL for the pruner")
    p.add_argument("--images", type=Path, required=True, help="image folder of the calibration records")
    p.add_argument("--bench", type=Path, nargs="+", required=True, help="benchmark JSONL files")
    p.add_argument("--out", type=Path, required=True, help="study folder; re-run the same command to resume")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6])
    p.add_argument("--pathways", nargs="+", default=["text", "visual"], help="text | visual")
    p.add_argument("--pools", nargs="+", default=["text", "visual", "mixed"], help="text | visual | mixed")
    p.add_argument("--method", default="wanda", help="wanda | sparsegpt (default wanda, as the paper)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None, help="skip calibration records longer than this")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.set_defaults(func=_probe)


def _probe(args: argparse.Namespace) -> int:
    from analysis.tables import to_markdown
    from mot_probe.study import ProbeJob, StudyConfig, run_probe_job

    config = StudyConfig(pathways=tuple(args.pathways), pools=tuple(args.pools), sparsities=tuple(args.sparsities),
                         method=args.method, seed=args.seed, batch_size=args.batch_size)
    job = ProbeJob(model=args.model, calib=args.calib, images=args.images, benchmarks=tuple(args.bench),
                   out=args.out, config=config, nsamples=args.nsamples, max_length=args.max_length,
                   dtype=args.dtype, device=args.device)
    result = run_probe_job(job)
    print(f"{result.computed} cells computed, {len(result.records) - result.computed} resumed; results in {args.out}")
    print(to_markdown(result.table))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole study on the embedded default model (smol-llava)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="smaller grid, fewer items (a few minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 32, quick 8)")
    p.add_argument("--n-eval", type=int, default=None, help="items per image benchmark (default 20, quick 6)")
    p.add_argument("--calib-batch-size", type=int, default=8, help="calibration samples per forward (default 8)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the default model is built")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from atv.demo import DemoConfig, run_demo

    config = DemoConfig(out=args.out, quick=args.quick, seed=args.seed, nsamples=args.nsamples, n_eval=args.n_eval,
                        calib_batch_size=args.calib_batch_size, cache_dir=args.cache_dir)
    result = run_demo(config)
    print(result.probe_table)
    print(result.method_table)
    print(f"report: {result.out / 'report.md'}  ({len(result.figures)} figure files; time {result.seconds} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atv", description="Modality-aware pruning of vision-language models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_probe(sub)
    _add_demo(sub)
    from atv import default_model  # default-model build|train, suite

    default_model.register(sub)
    from analysis import figures as analysis_figures  # atv figures
    analysis_figures.register(sub)
    from evaluation import eval_job  # atv eval
    eval_job.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except ToolkitError as err:
        print(f"atv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
