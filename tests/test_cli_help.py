"""`atv --help` and every command's --help teach: options in named groups, and examples at the end that the
real parser accepts (so an example cannot name a flag that no longer exists)."""

import argparse
import shlex

import pytest

from atv.cli import GROUP_TITLES, build_parser

PARSER = build_parser()
COMMANDS = {name: sub for name, sub in PARSER.commands.items()}
# the option groups each command shows (in this order); every option but --help sits in one of them
GROUPED = {
    "prune": ("model", "calibration", "method", "output", "execution"),
    "probe": ("model", "calibration", "method", "evaluation", "output", "execution"),
    "eval": ("model", "calibration", "evaluation", "output", "execution"),
    "demo": ("model", "calibration", "method", "evaluation", "output", "execution"),
}


def examples(parser: argparse.ArgumentParser) -> list[str]:
    """The example commands at the end of a parser's help (the lines after 'examples:' that start with atv)."""
    text = parser.format_help()
    assert "\nexamples:\n" in text, f"{parser.prog}: no examples section"
    lines = text.split("\nexamples:\n", 1)[1].splitlines()
    return [line.strip() for line in lines if line.strip().startswith("atv ")]



@pytest.mark.parametrize("name", ["atv", *COMMANDS])
def test_help_ends_with_two_or_three_examples(name):
    parser = PARSER if name == "atv" else COMMANDS[name]
    found = examples(parser)
    assert 2 <= len(found) <= 3, (name, found)
    assert parser.format_help().rstrip().endswith(found[-1])


@pytest.mark.parametrize("name", ["atv", *COMMANDS])
def test_every_example_parses_with_the_real_parser(name):
    parser = PARSER if name == "atv" else COMMANDS[name]
    for command in examples(parser):
        argv = shlex.split(command)[1:]
        args = build_parser().parse_args(argv)  # SystemExit (exit code 2) on an unknown or malformed flag
        if name != "atv":
            assert args.command == name, command


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_options_are_grouped(name):
    parser = COMMANDS[name]
    titles = [group.title for group in parser._action_groups]
    wanted = [GROUP_TITLES[g] for g in GROUPED[name]]
    assert [t for t in titles if t in GROUP_TITLES.values()] == wanted
    for group in parser._action_groups:
        flags = [a.option_strings[0] for a in group._group_actions]
        if group.title in GROUP_TITLES.values():
            assert flags, f"{name}: empty group {group.title!r}"
        else:  # argparse's own groups: only --help is left there
            assert flags in ([], ["-h"]), f"{name}: options outside the named groups: {flags}"
    help_text = parser.format_help()
    assert all(f"\n{title}:\n" in help_text for title in wanted)


def test_groups_change_no_flag():
    """Grouping is presentation only: the flags, their destinations and defaults are those of the dataclasses."""
    prune = COMMANDS["prune"]
    flags = {o for a in prune._actions for o in a.option_strings}
    assert {"--model", "--calib", "--method", "--sparsity", "--out", "--offload", "--recipe",
            "--no-memory-check"} <= flags
    args = build_parser().parse_args(["prune", "--model", "m", "--out", "o"])
    # sparsity None: 0.5, or N/M with --pattern
    assert (args.method, args.sparsity, args.nsamples, args.memory_check) == ("atv", None, 128, True)
