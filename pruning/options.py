"""Dataclass fields that also describe their command-line option, so each default and help text is
written once: on the config or job dataclass. ``atv.cli`` builds every parser from this metadata.

Example::

    @dataclass
    class Job:
        nsamples: int = option(128, "calibration samples")
        dtype: str = option("float32", "weights' dtype", choices=("float32", "bfloat16"))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from .errors import ConfigError

SEED_LIMIT = 2**32  # numpy's legacy seeding (transformers.set_seed, np.random.seed) takes seeds in [0, 2**32)


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
           flag: str | None = None, metavar: str | None = None, default_factory: Any = dataclasses.MISSING,
           cli: bool = True) -> Any:
    """A dataclass field with its option's help text (and ``choices`` -- shown in the help, checked by the
    dataclass itself; a callable is read when the parser is built, e.g. a registry's names --, ``flag``
    when the option is not ``--field-name``, ``metavar``). ``cli=False`` keeps the field off the command line."""
    metadata = {"help": help, "choices": choices, "flag": flag,
                "metavar": metavar, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` if it is an integer every RNG we seed accepts (numpy's: [0, 2**32)); else ConfigError naming it.

    One check for every seed a user gives (options, recipes, function arguments), so a seed fails where it enters
    and not, after loading a model, inside numpy."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{name} must be in [0, 2**32), got {seed!r}")
    return seed
