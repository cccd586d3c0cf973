import os
import sys

import pytest

# Tests import the shared tiny-model factory as `tiny_models`.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


HOSTILE = ("test_hostile_", "test_bad_inputs.py")  # the hostile-input suite: the files of these names


def pytest_terminal_summary(terminalreporter):
    """One line with the hostile-input suite's count: how many hostile cases ran, and how many held."""
    def hostile(report) -> bool:
        return any(name in getattr(report, "nodeid", "") for name in HOSTILE)

    # a test's outcome is its call's report, or its setup's when the setup errs or skips it
    counts = {outcome: sum(map(hostile, terminalreporter.stats.get(outcome, [])))
              for outcome in ("passed", "failed", "error", "skipped")}
    total = sum(counts.values())
    if total:
        terminalreporter.write_line(f"hostile-input suite: {total} cases, {counts['passed']} held, "
                                    f"{counts['failed'] + counts['error']} broke, {counts['skipped']} skipped")
