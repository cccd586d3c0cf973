"""The parsers are built from the jobs' dataclasses: every option's default is the dataclass default,
every field with option metadata is on the command line, and types and flags come through."""

import dataclasses
from pathlib import Path

import pytest

from atv.cli import build, build_parser
from atv.experiments.cells import CellSelection
from atv.experiments.demo import DemoConfig
from atv.experiments.eval_job import EvalJob, ProbeCell
from atv.experiments.executors import ExecutorOptions
from atv.experiments.probe_study import ProbeJob, StudyConfig
from atv.experiments.prune_job import PruneJob
from atv.experiments.sensitivity_map import MapConfig
from pruning.config import PruneConfig
from pruning.execution import ExecutionConfig
from pruning.io import LoadOptions

REQUIRED = {"prune": ["--model", "m", "--out", "o"],
            "probe": ["--model", "m", "--calib", "c.json", "--images", "i", "--bench", "b.jsonl", "--out", "o"],
            "demo": [], "eval": ["--tasks", "t.jsonl", "--model", "m"]}
CLASSES = {"prune": (PruneJob, LoadOptions, PruneConfig, ExecutionConfig),
           "probe": (ProbeJob, LoadOptions, StudyConfig, MapConfig, ExecutorOptions, CellSelection),
           "demo": (DemoConfig, ExecutorOptions), "eval": (EvalJob, LoadOptions)}


def _cli_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


@pytest.mark.parametrize("command", sorted(CLASSES))
def test_parser_defaults_are_the_dataclass_defaults(command):
    args = build_parser().parse_args([command, *REQUIRED[command]])
    for cls in CLASSES[command]:
        for field in _cli_fields(cls):
            if (field.metadata["flag"] or "--" + field.name.replace("_", "-")) in REQUIRED[command]:
                continue  # given above
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            assert getattr(args, field.name) == default, (cls.__name__, field.name)


@pytest.mark.parametrize("command", sorted(CLASSES))
def test_every_option_field_is_on_the_command_line(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    for cls in CLASSES[command]:
        for field in _cli_fields(cls):
            assert (field.metadata["flag"] or "--" + field.name.replace("_", "-")) in text


def test_options_are_typed_and_feed_the_dataclasses():
    args = build_parser().parse_args(["prune", *REQUIRED["prune"], "--sparsity", "0.6", "--targets", "mlp.up_proj",
                                      "--layers", "0", "2", "--seed", "3", "--offload"])
    job = build(PruneJob, args, config=build(PruneConfig, args), execution=build(ExecutionConfig, args))
    assert job.model == "m" and job.seed == 3 and job.config.seed == 3  # one --seed feeds both
    assert job.config.sparsity == 0.6 and job.config.targets == ("mlp.up_proj",) and job.config.layers == (0, 2)
    assert job.execution.offload is True
    args = build_parser().parse_args(["eval", "--tasks", "a.jsonl",
                                      "--probe-from", "runs/p/results.jsonl:text/text/0.5",
                                      "--no-lmms-defaults"])
    job = build(EvalJob, args, load=build(LoadOptions, args))
    assert job.probe_from == ProbeCell(Path("runs/p/results.jsonl"), "text", "text", 0.5)
    assert job.lmms_defaults is False
