"""What a pruned checkpoint says about itself: a ``sparsity_config`` entry in config.json (the schema of
compressed-tensors' ``SparsityCompressionConfig``, kept out of ``quantization_config`` so loading never
needs compressed-tensors), a model card (``README.md`` with Hub front matter) and the environment a
result was produced in.
"""

from __future__ import annotations

import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from analysis.tables import with_interval
from pruning.adapters import get_adapter
from pruning.engine import PruneReport
from pruning.errors import ConfigError, HubError, one_line
from pruning.io import dtype_name

CARD = "README.md"
Interval = Sequence[float] | None  # [low, high] of a 95% bootstrap interval, or None
_PACKAGES = ("atv-toolkit", "torch", "transformers", "accelerate", "lmms-eval")


def environment(model: nn.Module | None = None) -> dict[str, Any]:
    """Versions of the toolkit and the libraries a result depends on, Python, and the model's device and
    dtype (no machine paths)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    out: dict[str, Any] = {"versions": versions, "python": platform.python_version()}
    if model is not None:
        out.update(device=next(model.parameters()).device.type, dtype=dtype_name(model))
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as the user typed it (``atv`` and its arguments, shell-quoted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["atv", *args])


def sparsity_config(model: nn.Module, report: PruneReport) -> dict[str, Any]:
    """The ``sparsity_config`` entry for config.json: format 'dense' (zeros stored as such), the global
    sparsity of the pruned weights (zeros / weights, measured), the structure ('unstructured' or 'N:M'),
    the pruned Linears as targets (one regex per projection when every decoder layer was pruned) and
    what was left dense as ignore."""
    adapter = get_adapter(model)
    modules = dict(model.named_modules())
    prefixes = _layer_names(model, adapter)
    counts = {f"{prefixes[layer.index]}.{rel}": value for layer in report.layers
              for rel, value in layer.sparsity.items()}  # measured fraction of zeros (offloaded weights too)
    names = sorted(counts)
    zeros = sum(round(counts[n] * modules[n].weight.numel()) for n in names)
    total = sum(modules[n].weight.numel() for n in names)
    pattern = report.config.get("pattern")
    return {"format": "dense", "global_sparsity": zeros / max(total, 1),
            "sparsity_structure": pattern if pattern else "unstructured",
            "targets": _targets(prefixes, report, names), "ignore": ["lm_head", "re:.*(vision|visual).*"]}


def _layer_names(model: nn.Module, adapter) -> list[str]:
    """The full dotted name of every decoder layer (one pass over the model's modules)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in adapter.decoder_layers(model)]


def _targets(prefixes: list[str], report: PruneReport, names: list[str]) -> list[str]:
    if len(report.layers) != len(prefixes):
        return names
    stack = prefixes[0].rpartition(".")[0]
    relative = sorted({rel for layer in report.layers for rel in layer.sparsity})
    return [f"re:^{re.escape(stack)}\\.\\d+\\.{re.escape(rel)}$" for rel in relative]


def model_card(report: PruneReport, record: Mapping[str, Any], *, base_model: str, command: str,
               calibration: Mapping[str, Any] | None) -> str:
    """A model card: Hub front matter, how the model was pruned, per-layer sparsity, the calibration
    samples, the toolkit version and the exact command. ``atv eval --out-card`` appends results."""
    config = report.config
    env = record.get("environment", {})
    rule = (f"fixed visual ratio {config.get('visual_ratio')}" if config.get("visual_ratio") is not None
            else f"alpha {config.get('alpha')}")
    lines = ["---", f"base_model: {base_model}", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags:", "- pruned", "- sparsity", f"- {config.get('method')}", "- atv-toolkit", "---", "",
             f"# {base_model.rstrip('/').rpartition('/')[2]} pruned with {config.get('method')}", "",
             f"- method: `{config.get('method')}` (scorer `{config.get('scorer')}`, pool `{config.get('pool')}`)",
             f"- ATV rule: {rule}" if config.get("pool") in ("atv", "random-visual") else None,
             f"- sparsity: {_sparsity_line(report)}; measured mean {report.sparsity:.4f}",
             f"- calibration: {_calibration(calibration)}",
             f"- toolkit: atv-toolkit {env.get('versions', {}).get('atv-toolkit')}, transformers "
             f"{env.get('versions', {}).get('transformers')}, torch {env.get('versions', {}).get('torch')}",
             "", "Command:", "", "```bash", command, "```", "", "## Sparsity per layer", "",
             *_layer_table(report), "", "## Evaluation", "", "No evaluation recorded yet "
             "(`atv eval --model THIS_FOLDER --tasks ... --out-card` appends one).", ""]
    return "\n".join(line for line in lines if line is not None)


def _sparsity_line(report: PruneReport) -> str:
    """How the sparsity was spread: per output row (uniform) or by a non-uniform allocation."""
    config = report.config
    if not report.allocation:
        return f"{config.get('pattern') or config.get('sparsity')} per output row"
    spread = [unit["sparsity"] for unit in report.allocation["units"]]
    return (f"{config.get('sparsity')} global, allocated by `{config.get('allocation')}` (lambda "
            f"{config.get('allocation_lambda')}; per unit {min(spread):.4f} to {max(spread):.4f}, see "
            "prune_report.json)")


def _calibration(calibration: Mapping[str, Any] | None) -> str:
    if not calibration:
        return "none (magnitude)"
    ids = calibration.get("ids", [])
    shown = ", ".join(ids[:16]) + (f", ... ({len(ids)} in all)" if len(ids) > 16 else "")
    return f"{calibration.get('source', '?')}, {calibration.get('used', len(ids))} samples (ids: {shown})"


def _layer_table(report: PruneReport) -> list[str]:
    projections = sorted({rel for layer in report.layers for rel in layer.sparsity})
    short = [p.rpartition(".")[2] for p in projections]
    rows = ["| layer | " + " | ".join(short) + " |", "|---:|" + "---:|" * len(short)]
    for layer in report.layers:
        rows.append(f"| {layer.index} | " + " | ".join(f"{layer.sparsity.get(p, float('nan')):.3f}"
                                                      for p in projections) + " |")
    return rows


def append_results(card: str, results_markdown: str) -> str:
    """The card with an evaluation section appended (the placeholder line replaced on the first one)."""
    placeholder = "No evaluation recorded yet"
    lines = [line for line in card.splitlines() if not line.startswith(placeholder)]
    return "\n".join(lines).rstrip("\n") + "\n\n" + results_markdown.strip("\n") + "\n"


def results_section(title: str, rows: Sequence[tuple[str, str, float, Interval, float | None, Interval]]) -> str:
    """An evaluation section for the card: (task, metric, score, its interval, retention, its interval) rows;
    a value with an interval reads ``71.30 [64.0, 78.1]``, a missing interval (None) leaves the value alone,
    a missing retention is '-'."""
    lines = [f"### {title}", "", "| task | metric | score | retention (% of dense) |", "|---|---|---:|---:|"]
    for task, metric, score, score_ci, kept, kept_ci in rows:
        lines.append(f"| {task} | {metric} | {with_interval(score, score_ci)} | "
                     f"{'-' if kept is None else with_interval(kept, kept_ci)} |")
    return "\n".join(lines)


def check_repo_id(repo: str) -> str:
    """Refuse (before any work) a Hub repository id the Hub would reject (``org/name`` or ``name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ConfigError(f"--push-to-hub {repo!r} is not a Hub repository id: give org/name (letters, digits, "
                          "'-', '_' and '.', at most 96 characters)") from None
    return repo


def check_hub_access(repo: str, out: str | Path) -> str:
    """Before any work: ``--push-to-hub`` will be able to upload (the Hub not switched off, reachable, and a
    token it accepts); returns the Hub user name. ``out``: the folder the upload would send, for the hint."""
    from huggingface_hub import HfApi, constants

    later = f"or drop --push-to-hub and upload the folder when you can (hf upload {repo} {out})"
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"--push-to-hub {repo!r}: the Hub is switched off here (HF_HUB_OFFLINE is set); unset "
                          f"it, {later}")
    try:
        user = HfApi().whoami()
    except Exception as err:  # noqa: BLE001 - a probe: no network, no token and a refused token all end here
        raise HubError(f"--push-to-hub {repo!r}: the Hub cannot be reached with a token it accepts "
                          f"({type(err).__name__}: {one_line(err)}); check the network and log in with "
                          f"`hf auth login` (or set HF_TOKEN), {later}") from None
    return str(user.get("name", "")) if isinstance(user, dict) else ""


def push_folder(folder: str | Path, repo: str, *, private: bool = False) -> str:
    """Upload a saved folder (weights, card, recipe, report) to a Hub model repository, creating it if
    needed; returns the repository's URL. Needs a Hub token (``huggingface-cli login``)."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                      commit_message="Upload a model pruned with atv-toolkit")
    return str(url)


__all__ = ["CARD", "append_results", "check_hub_access", "check_repo_id", "command_line", "environment",
           "model_card", "push_folder", "results_section", "sparsity_config"]
