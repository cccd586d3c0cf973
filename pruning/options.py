"""Dataclass fields that also describe their command-line option and their valid values, so each default,
help text, type, choice list and range is written once: on the config or job dataclass. ``atv.cli`` builds
every parser from this metadata, and :func:`check_fields` (called in ``__post_init__``) checks it.

Example::

    @dataclass
    class Job:
        nsamples: int = option(128, "calibration samples", within=">= 1")
        dtype: str = option("float32", "weights' dtype", choices=("float32", "bfloat16"))

        def __post_init__(self) -> None:
            check_fields(self)  # nsamples=0 -> ConfigError("nsamples must be >= 1, got 0")
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import ConfigError

SEED_LIMIT = 2**32  # numpy's legacy seeding (transformers.set_seed, np.random.seed) takes seeds in [0, 2**32)
SEED_RANGE = "[0, 2**32)"


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           choices: Sequence[Any] | Mapping[str, Any] | Callable[[], Sequence[Any]] | None = None,
           within: str | None = None, label: str | None = None, key: str | None = None,
           flag: str | None = None, metavar: str | None = None, default_factory: Any = dataclasses.MISSING,
           cli: bool = True) -> Any:
    """A dataclass field with its option's help text and what :func:`check_fields` checks.

    choices: the valid values (shown in the help). A mapping is a registry of names (refused as ``unknown
    <label> 'x'; choose one of [...]``); a callable is read when needed (e.g. names imported late).
    within: the valid range of a number (of each item of a tuple): ``"[0, 1)"``, ``"(0, 1)"``, ``">= 1"``,
    ``"> 0"``. Integer fields of one class with the same range are checked and named together.
    label: the singular name in messages about the items of a tuple field (``pathway`` for ``pathways``).
    key: the setting's name on the command line, in recipes and in ``to_dict`` when it is not the field's
    (``owl_m`` for :class:`pruning.config.OWL`'s ``m``). flag: the option when not ``--key``; metavar.
    ``cli=False`` keeps the field off the command line."""
    metadata = {"help": help, "choices": choices, "within": within, "label": label, "key": key, "flag": flag,
                "metavar": metavar, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_key(field: dataclasses.Field) -> str:
    """The name a field goes by on the command line, in recipes and in flat dicts."""
    return field.metadata.get("key") or field.name


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` if it is an integer every RNG we seed accepts (numpy's: [0, 2**32)); else ConfigError naming it.

    One check for every seed a user gives (options, recipes, function arguments), so a seed fails where it enters
    and not, after loading a model, inside numpy."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not _in_range(seed, SEED_RANGE):
        raise ConfigError(f"{name} must be in {SEED_RANGE}, got {seed!r}")
    return seed


# -- the one check ---------------------------------------------------------------------------------------
def check_fields(obj: Any) -> None:
    """Check every field of the dataclass ``obj`` against its annotation (bool, int, float, tuples of
    them; ``None`` where the annotation allows it), its ``choices`` and its ``within`` range, in field order;
    ConfigError naming the field (by its key) and the bad value. Converts in place what is unambiguous: a list
    for a tuple field becomes a tuple, an int for a float field a float (frozen dataclasses too)."""
    ranged: dict[tuple[str, str | None], list[tuple[str, Any]]] = {}
    for field, hint in _fields(type(obj)):
        name, value = option_key(field), getattr(obj, field.name)
        if value is None and _allows_none(hint):
            continue
        kind, many = _scalar(hint)
        if many:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {value!r}")
            value = tuple(_typed(name, item, kind, value) for item in value)
        else:
            value = _typed(name, value, kind, value)
        object.__setattr__(obj, field.name, value)
        choices = field.metadata.get("choices")
        if choices is not None:
            _check_choice(name, field.metadata.get("label") or name, value, many, choices)
        within = field.metadata.get("within")
        if within is not None:
            if many and not value:
                raise ConfigError(f"{name} must be in {within}, got []")
            # counts with one range are named together ("map_items, batch_size and max_new_tokens must be >= 1")
            ranged.setdefault((within, None if kind is int else name), []).append((name, value))
    for (within, _), named in ranged.items():
        if any(not _in_range(v, within) for _, value in named for v in (value if isinstance(value, tuple) else
                                                                          (value,))):
            raise ConfigError(f"{_and([n for n, _ in named])} must be {_spelled(within)}, got "
                              f"{_and([_shown(v) for _, v in named])}")


@lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.init or f.metadata)


def _allows_none(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _scalar(hint: Any) -> tuple[Any, bool]:
    """(scalar type, tuple of them?) of an annotation: ``tuple[float, ...] | None`` -> (float, True)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _scalar(options[0]) if len(options) == 1 else (None, False)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return (args[0] if len(args) == 2 and args[1] is Ellipsis else None), True
    return hint, False


def _typed(name: str, value: Any, kind: Any, whole: Any) -> Any:
    """``value`` checked against ``kind`` (bool, int, float; other kinds are not checked here)."""
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {whole!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer, got {whole!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {whole!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {whole!r}")
        return float(value)
    return value


def _check_choice(name: str, label: str, value: Any, many: bool, choices: Any) -> None:
    allowed = choices() if callable(choices) else choices
    if isinstance(allowed, Mapping):  # a registry: the names are sorted
        for item in value if many else (value,):
            if item not in allowed:
                raise ConfigError(f"unknown {label} {item!r}; choose one of {sorted(allowed)}")
        if many and not value:
            raise ConfigError(f"{name} is empty; choose from {sorted(allowed)}")
        return
    allowed = list(allowed)
    if many:
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            raise ConfigError(f"unknown {label} {bad or '(none)'}; choose from {allowed}")
    elif value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


def _bounds(within: str) -> tuple[str, float, str | None, float | None]:
    """'[0, 1)' -> ('[', 0, ')', 1); '>= 1' -> ('>=', 1, None, None)."""
    def number(text: str) -> float:
        base, _, power = text.strip().partition("**")
        return float(base) ** float(power) if power else float(base)
    text = within.strip()
    if text[0] in "[(":
        low, high = text[1:-1].split(",")
        return text[0], number(low), text[-1], number(high)
    op = text[:2] if text[1] == "=" else text[0]
    return op, number(text[len(op):]), None, None


def _in_range(value: float, within: str) -> bool:
    low_op, low, high_op, high = _bounds(within)
    above = value >= low if low_op in ("[", ">=") else value > low
    if high_op is None:
        return above
    return above and (value <= high if high_op == "]" else value < high)


def _spelled(within: str) -> str:
    return f"in {within}" if within.strip()[0] in "[(" else within.strip()


def _shown(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def read_yaml_mapping(path: str | Path, what: str = "recipe") -> dict[Any, Any]:
    """The mapping a YAML file (a recipe) holds, or a ConfigError saying why it cannot be read."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must be a mapping of option: value, got {type(data).__name__}")
    return data


# -- devices -----------------------------------------------------------------------------------------------
def parse_device(name: str, value: str | None):
    """``value`` parsed as a torch device (None stays None), or a ConfigError naming ``name`` and the value:
    one parser for every device a user gives (``--device``, ``--offload-device``, ``--execution-device``).
    ``meta`` is refused: it holds shapes without data, so nothing can be loaded, run or kept there."""
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"{name} must name a torch device (e.g. 'cpu', 'cuda:0'), got {value!r}: device {value!r} "
                          f"is not a torch device ({reason})") from None
    if device.type == "meta":
        raise ConfigError(f"{name} must be a device that holds data (e.g. 'cpu', 'cuda:0'), got {value!r}: device "
                          f"{value!r} holds no data (shapes only), so no model can be loaded, run or pruned on it")
    return device
