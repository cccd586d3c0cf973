"""Which image-text-to-text families the toolkit handles: a markdown table for the documentation
(docs/families.md embeds the file it writes, benchmarks/results/families.md).

For every family with a tiny recipe (tests/tiny_families.py) it builds a random tiny model and runs
the checks of tests/family_checks.py: structural discovery (blocks, projections), exact replay,
exact probe (attach / prune a path / reset / unload), exact per-row sparsity (ATV when the inputs
hold image tokens, else Wanda) and save/reload. With ``--sweep`` it also shrinks the default config
of every other model type transformers lists, builds it on the meta device and reports what
discovery finds, or why the model is refused (no input recipe: replay and the rest are not run).

    python scripts/families_table.py                      # table on stdout
    python scripts/families_table.py --sweep --out families.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

HEADER = ("| model type | blocks | projections per block kind, [grouped by the tensor they read] | left out | replay "
          "| probe | prune | save |\n"
          "|---|---|---|---|---|---|---|---|")


def _status(check: Callable[[], None]) -> str:
    """'exact' when ``check`` passes, else the first line of what went wrong."""
    try:
        check()
        return "exact"
    except Exception as err:  # noqa: BLE001 - every failure becomes a table cell
        return f"FAIL: {type(err).__name__}: {str(err).splitlines()[0][:80]}"


def _projections(model) -> tuple[str, str, str]:
    """(blocks cell, projections cell, skipped cell) from structural discovery."""
    from pruning.adapters import find_decoder_layers, get_adapter

    adapter = get_adapter(model)
    name, layers = find_decoder_layers(model)
    kinds = {adapter.projections(model, i).names for i in range(len(layers))}
    skipped = sorted({f"{k} ({why.split(' (')[0]})" for i in range(len(layers))
                      for k, why in adapter.projections(model, i).skipped.items()})
    projections = "<br>".join(", ".join(names) for names in sorted(kinds))
    return f"{len(layers)} at `{name}` ({adapter.name})", projections, ", ".join(skipped) or "-"


def _grouped(kinds: list[list[tuple[str, ...]]]) -> str:
    """'[q k v] [o] ...' per kind of block, one line each."""
    return "<br>".join(" ".join(f"[{', '.join(group)}]" for group in groups) for groups in kinds)


def tested_row(family: str) -> str:
    """One table row: discovery, then the four exactness checks on a fresh copy each."""
    import family_checks as checks
    from tiny_families import IMAGE, FamilyUnavailable, build_family

    try:
        model, inputs = build_family(family)
        blocks, _, skipped = _projections(model)
        projections = _grouped(checks.input_groups(model, inputs))
    except (FamilyUnavailable, Exception) as err:  # noqa: BLE001
        return f"| {family} | refused or unavailable: {type(err).__name__}: {str(err).splitlines()[0][:120]} |||||||"
    method = "atv" if bool((inputs["input_ids"] == IMAGE).any()) else "wanda"
    fresh = lambda: copy.deepcopy(model)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        cells = [_status(lambda: checks.check_replay(model, inputs)),
                 _status(lambda: checks.check_probe(fresh(), inputs)),
                 _status(lambda: checks.check_prune(fresh(), inputs, method)) + f" ({method})",
                 _status(lambda: checks.check_save(fresh(), tmp))]
    return f"| {family} | {blocks} | {projections} | {skipped} | " + " | ".join(cells) + " |"


def sweep_row(model_type: str) -> str:
    """Discovery only, on the shrunk default config of ``model_type``, built on the meta device
    (structure without weights: no memory, and a config left large by shrinking costs nothing)."""
    import torch
    import transformers as tf
    from tiny_families import shrink
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = _fill_counts(shrink(CONFIG_MAPPING[model_type]()))
        with torch.device("meta"):
            model = _build(tf, model_type, config)
    except ImportError as err:  # a package this environment lacks (e.g. timm, torchvision)
        return f"| {model_type} | not built here: {' '.join(str(err).split())[:120]} |||||||"
    except Exception as err:  # noqa: BLE001
        return f"| {model_type} | not built from a shrunk default config: {type(err).__name__} |||||||"
    try:
        blocks, projections, skipped = _projections(model)
    except Exception as err:  # noqa: BLE001
        return f"| {model_type} | refused: {str(err).splitlines()[0][:160]} |||||||"
    refusal = _structural_refusal(model)
    status = f"refused: {refusal}" if refusal else "no input recipe"
    return f"| {model_type} | {blocks} | {projections} | {skipped} | {status} | | | |"


# mixture-of-experts sizes some default configs leave None (their checkpoints set them): small values that build
_COUNTS = {"num_experts": 2, "num_local_experts": 2, "top_k_experts": 1, "num_experts_per_tok": 1}


def _fill_counts(config):
    """``config`` with expert counts and sizes its defaults leave None set small (in every sub-config)."""
    for sub in [config, *(getattr(config, key) for key in getattr(config, "sub_configs", {}) if
                          getattr(config, key, None) is not None)]:
        for key, value in _COUNTS.items():
            if hasattr(sub, key) and getattr(sub, key) is None:
                setattr(sub, key, value)
        if hasattr(sub, "moe_intermediate_size") and sub.moe_intermediate_size is None:
            sub.moe_intermediate_size = getattr(sub, "intermediate_size", None) or 64
    return config


def _build(tf, model_type: str, config):
    """The image-text-to-text class of ``model_type``: through the Auto class, else (a class the Auto class does
    not accept for its config, e.g. evolla) the class the mapping names, directly."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        return tf.AutoModelForImageTextToText.from_config(config)
    except ValueError:
        return getattr(tf, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])._from_config(config)


def _structural_refusal(model) -> str | None:
    """What pruning or the probe would refuse on this model's structure alone (expert layouts the engine
    cannot record, experts the probe cannot route), as the toolkit's own message; None when nothing."""
    from mot_probe import attach_probe_
    from pruning.adapters import get_adapter
    from pruning.config import PruneConfig
    from pruning.experts import block_targets

    adapter = get_adapter(model)
    for label, check in (("prune", lambda: [block_targets(adapter, model, i, PruneConfig().targets)
                                            for i in range(len(adapter.decoder_layers(model)))]),
                         ("probe", lambda: attach_probe_(model).unload())):
        try:
            check()
        except Exception as err:  # noqa: BLE001 - the refusal becomes the table cell
            return f"{label}: {' '.join(str(err).split())[:400]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also discover every other listed model type")
    parser.add_argument("--out", type=Path, help="write the table here (default: stdout)")
    args = parser.parse_args(argv)

    import transformers as tf
    from tiny_families import TESTED
    from tiny_models import FAMILIES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    start = time.perf_counter()
    rows = [tested_row(f) for f in TESTED]
    if args.sweep:
        others = [t for t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if t not in TESTED and t not in FAMILIES]
        rows += [sweep_row(t) for t in sorted(others)]
    # no timing in the table: the same transformers version gives the same bytes
    note = (f"transformers {tf.__version__}; registered families (tested in tests/test_adapters.py and "
            f"tests/test_mot_probe.py): {', '.join(FAMILIES)}")
    table = "\n".join([HEADER, *rows, "", note]) + "\n"
    sys.stderr.write(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s\n")
    if args.out:
        args.out.write_text(table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
