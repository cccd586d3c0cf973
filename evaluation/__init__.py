"""Evaluation harness: how much of a dense LVLM's ability a pruned (or probed) model retains.

Benchmarks are local JSON Lines files (:mod:`.benchmarks`); scoring math is pure (:mod:`.metrics`);
the harness runs the model (:mod:`.harness`) through the shared prompt and encoding (:mod:`.model_io`)
and returns report dataclasses (:mod:`.reports`).

Example::

    from evaluation import evaluate, fidelity_reference, load_benchmark, retention
    benches = [load_benchmark(p) for p in paths]
    reference = fidelity_reference(dense, processor, benches)
    dense_report = evaluate(dense, processor, benches, reference=reference)
    pruned_report = evaluate(pruned, processor, benches, reference=reference)
    print(retention(pruned_report, dense_report).mean)
"""

from .benchmarks import Benchmark, BenchmarkError, ChoiceItem, OpenItem, TextItem, load_benchmark
from .harness import FidelityReference, evaluate, fidelity_reference, score_choice, score_fidelity, score_open
from .metrics import normalize_answer, vqa_accuracy
from .model_io import build_prompt
from .reports import BenchmarkResult, EvalReport, ItemResult, RetentionReport, defined_retention, retention

__all__ = [
    "Benchmark", "BenchmarkError", "BenchmarkResult", "ChoiceItem", "EvalReport", "FidelityReference", "ItemResult",
    "OpenItem", "RetentionReport", "TextItem", "build_prompt", "defined_retention", "evaluate", "fidelity_reference",
    "load_benchmark", "normalize_answer", "retention", "score_choice", "score_fidelity", "score_open", "vqa_accuracy",
]
