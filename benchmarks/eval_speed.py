"""Throughput of the probe study's evaluation on the default model, before and after a change, in one run.

"before" is the toolkit at a git revision (``--before``, default the last commit whose harness forwarded
every prompt whole and projected every position onto the vocabulary), exported with ``git archive`` into a
temporary folder; "after" is this working tree. Each variant runs in its own process, alternating, on the
same inputs: the default model with the MoT probe attached and its text path pruned to 50% (every routed
projection splits its tokens between two copies, as in a study cell), scored on the demo suite's
benchmarks with the study's evaluation batch. A process evaluates once to warm up (and, after the change,
to verify that the model may share the prompts' preamble, which a study does once), then times the
following calls. Reported: items per second per variant and per benchmark, their ratio, and the agreement
of every prediction and score between the variants.

    python benchmarks/eval_speed.py --out benchmarks/results/eval_speed_smol_llava.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "481eaf6"  # main before the shared preamble and logits_to_keep in the harness


def worker(args: argparse.Namespace) -> None:
    """Runs inside one variant's tree: time ``evaluate`` on the probed, half-pruned default model."""
    import torch

    torch.set_num_threads(args.threads)
    from evaluation import evaluate, fidelity_reference
    from mot_probe import attach_probe_
    from pruning import PruneConfig
    from pruning.io import load_model

    suite = Path(args.suite)
    names = json.loads((suite / "suite.json").read_text(encoding="utf-8"))["benchmarks"]
    benches = [suite / f"{name}.jsonl" for name in names]
    model, processor = load_model(args.model)
    reference = fidelity_reference(model, processor, benches, progress=False)
    probe = attach_probe_(model)
    probe.prune_path_("text", PruneConfig("magnitude", sparsity=0.5), progress=False)

    def run():
        start = time.perf_counter()
        report = evaluate(model, processor, benches, reference=reference, batch_size=args.batch_size,
                          progress=False, return_items=True)
        return time.perf_counter() - start, report

    first, report = run()
    seconds = [run()[0] for _ in range(args.calls)]
    items = {r.name: {i.id: [i.prediction, i.score, i.details.get("logprobs")] for i in r.items}
             for r in report.results}
    per_bench = {}
    for bench_path in benches:  # one benchmark at a time, for the per-kind split
        start = time.perf_counter()
        evaluate(model, processor, [bench_path], reference=reference, batch_size=args.batch_size, progress=False)
        per_bench[bench_path.stem] = time.perf_counter() - start
    n_items = sum(r.n for r in report.results)
    Path(args.result).write_text(json.dumps({"first_call": first, "seconds": seconds, "items": n_items,
                                             "per_benchmark_seconds": per_bench, "scores": items}), encoding="utf-8")


def export(revision: str, folder: Path) -> Path:
    """The repository at ``revision`` as plain files under ``folder``."""
    archive = folder / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision], check=True)
    tree = folder / revision
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def run_variant(tree: Path, args: argparse.Namespace, model: Path, suite: Path, result: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model), "--suite", str(suite),
           "--result", str(result), "--calls", str(args.calls), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    subprocess.run(cmd, check=True, env=env, cwd=tree)
    return json.loads(result.read_text(encoding="utf-8"))


def agreement(before: dict, after: dict) -> dict:
    """Predictions that differ and the largest log-prob / score difference between the variants."""
    differ, worst = [], 0.0
    for bench, items in before.items():
        for item_id, (pred, score, logprobs) in items.items():
            pred2, score2, logprobs2 = after[bench][item_id]
            if pred != pred2:
                differ.append(f"{bench}/{item_id}")
            worst = max(worst, abs(score - score2), *(abs(a - b) for a, b in zip(logprobs or [], logprobs2 or [])))
    return {"predictions_differ": differ, "max_abs_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help="git revision measured as 'before' (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    parser.add_argument("--calls", type=int, default=2, help="timed evaluations per process (after one warm-up)")
    parser.add_argument("--n-eval", type=int, default=24, help="items per benchmark of the demo suite")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch (the study's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--suite", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT))
    from atv.default_model import build_default_model
    from atv.suite import write_suite

    model = build_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        suite = write_suite(tmp / "suite", seed=0, n_eval=args.n_eval, n_calib=8)
        trees = {"before": export(args.before, tmp), "after": ROOT}
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(run_variant(tree, args, model, suite, tmp / f"{name}-{r}.json"))
                print(f"round {r + 1} {name}: {runs[name][-1]['seconds']}", flush=True)
    out = {"setup": {"model": "default (smol-llava)", "probe": "text path pruned 50% (magnitude)",
                     "n_eval": args.n_eval, "batch_size": args.batch_size, "threads": args.threads,
                     "before": args.before, "after": _head(), "rounds": args.rounds, "calls": args.calls},
           "agreement": agreement(runs["before"][0]["scores"], runs["after"][0]["scores"])}
    for name, variant in runs.items():
        seconds = statistics.median(s for run in variant for s in run["seconds"])
        per_bench = {b: statistics.median(run["per_benchmark_seconds"][b] for run in variant)
                     for b in variant[0]["per_benchmark_seconds"]}
        out[name] = {"median_seconds": seconds, "items_per_second": variant[0]["items"] / seconds,
                     "first_call_seconds": statistics.median(run["first_call"] for run in variant),
                     "per_benchmark_seconds": per_bench}
    out["speedup"] = out["after"]["items_per_second"] / out["before"]["items_per_second"]
    out["per_benchmark_speedup"] = {b: out["before"]["per_benchmark_seconds"][b] / s
                                    for b, s in out["after"]["per_benchmark_seconds"].items()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


def _head() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "evaluation"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + (" + uncommitted evaluation/ changes" if dirty else "")


if __name__ == "__main__":
    main()
