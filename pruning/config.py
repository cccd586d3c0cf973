"""What to prune and how: one small validated dataclass per method, registered with its scorer and default pool.

A method config is a :class:`MethodConfig` (the settings every method takes: sparsity, pattern, targets, layers,
propagation, seed and the :ref:`allocation <allocations>`) registered in one place, next to its own settings::

    @register_method("sparsegpt", scorer="sparsegpt", pool="all")
    @dataclass
    class SparseGPTConfig(CalibratedConfig):
        blocksize: int = option(128, "SparseGPT column block", within=">= 1")

So a new method is one file: its scorer (:func:`pruning.registry.register_scorer`), a pool if it needs a new
one, and its config class. The built-in methods:

=====================  ===========  ============
config (method)        scorer       default pool
=====================  ===========  ============
MagnitudeConfig        |W|          (none: no calibration)
WandaConfig            Wanda        all
ATVConfig              Wanda        atv
SparseGPTConfig        SparseGPT    all
TAMPConfig             Wanda        tamp
=====================  ===========  ============

Any method that scores with activations (a :class:`CalibratedConfig`) accepts any pool, e.g.
``SparseGPTConfig(pool="atv")``. ``allocation`` spreads the sparsity non-uniformly at the same global budget:
:class:`Uniform` (the default), :class:`OWL` (over layers) or :class:`MapAllocation` (over layers and projection
groups, from a sensitivity map) (:mod:`pruning.allocation`). How to run (offloading, pass schedule) is
:class:`pruning.execution.ExecutionConfig`.

Every config converts to and from the flat dict the command line and recipes use (``to_dict``,
:func:`from_dict`, :func:`from_yaml`: a ``recipe.yaml`` saved by ``atv prune`` loads without argparse), and
:class:`PruneConfig` is that flat form as a dataclass -- ``PruneConfig("atv", sparsity=0.6, alpha=0.5)`` -- kept
for the command line and for code written against one flat config.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, TypeVar

import torch

from . import pools, scores, sparsegpt, tamp  # noqa: F401  (they register the built-in scorers and pools)
from .adapters import DECODER_PROJ
from .allocation import ALLOCATIONS
from .errors import ConfigError
from .options import SEED_RANGE, check_fields, option, option_key, read_yaml_mapping
from .registry import POOLS, PoolParams, get_pool, get_scorer, lookup

DEFAULT_METHOD = "atv"
METHOD_CONFIGS: dict[str, type["MethodConfig"]] = {}  # method name -> its config class (register_method)

C = TypeVar("C", bound=type)


def register_method(name: str, *, scorer: str, pool: str | None) -> Callable[[C], C]:
    """Register the dataclass ``cls`` (a :class:`MethodConfig`) as method ``name``, scoring with the registered
    scorer ``scorer`` on the calibration pool ``pool`` by default (None: the scorer uses no calibration data).
    The names are checked when a config is made, so the scorer may be registered after the method.

    Args:
        name: the method's name (``--method NAME``, a recipe's ``method:``).
        scorer: the registered scorer that turns weights (and statistics) into scores.
        pool: the registered calibration pool used by default; None when the scorer uses no activations.

    Returns:
        The class decorator; it registers the class and returns it unchanged.

    Raises:
        ConfigError: the decorated object is not a MethodConfig subclass.
    """
    def register(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
            raise ConfigError(f"method {name!r}: register a MethodConfig subclass, got {cls!r}")
        cls.method, cls.scorer, cls.default_pool = name, scorer, pool
        METHOD_CONFIGS[name] = cls
        return cls
    return register


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); validates 0 < N < M."""
    if pattern is None or isinstance(pattern, tuple):
        nm = pattern
    else:
        try:
            n, m = (int(p) for p in str(pattern).split(":"))
        except ValueError:
            raise ConfigError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
        nm = (n, m)
    if nm is not None and not 0 < nm[0] < nm[1]:
        raise ConfigError(f"N:M pattern needs 0 < N < M, got {nm[0]}:{nm[1]}")
    return nm


# -- allocations -------------------------------------------------------------------------------------------
def _spread_option() -> Any:
    return option(0.08, "owl/map: layer sparsities spread over 2*lambda around the target", key="allocation_lambda",
                  within="[0, 0.5)")


@dataclass(frozen=True)
class Uniform:
    """Every pruned Linear prunes the target sparsity of each row (the default)."""

    kind: ClassVar[str] = "uniform"


@dataclass(frozen=True)
class OWL:
    """Outlier-weighted layer-wise sparsity (from the dense Wanda scores): fewer pruned weights where more outliers.

    Args:
        m: a Wanda score is an outlier above ``m`` times its layer's mean.
        lmbda: the layers' sparsities spread over 2 * lmbda around the target, in [0, 0.5).

    Raises:
        ConfigError: a value out of its range.
    """

    m: float = option(5.0, "owl: a Wanda score is an outlier above owl_m x its layer's mean", key="owl_m",
                      within="> 0")
    lmbda: float = _spread_option()
    kind: ClassVar[str] = "owl"

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class MapAllocation:
    """Sparsity per layer and attention/FFN group from a sensitivity map of ``atv probe --map``.

    Args:
        path: ``sensitivity_map.json`` of ``atv probe --map`` (or its folder).
        lmbda: the groups' sparsities spread over 2 * lmbda around the target, in [0, 0.5).

    Raises:
        ConfigError: a path that is not a path, or a value out of its range.
    """

    path: str = option(help="map: sensitivity_map.json of atv probe --map (or its folder)", key="allocation_map")
    lmbda: float = _spread_option()
    kind: ClassVar[str] = "map"

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)):
            raise ConfigError(f"allocation_map must be a path, got {self.path!r}")
        object.__setattr__(self, "path", str(self.path))
        check_fields(self)


AllocationConfig = Uniform | OWL | MapAllocation
ALLOCATION_CONFIGS: dict[str, type] = {cls.kind: cls for cls in (Uniform, OWL, MapAllocation)}  # keys: ALLOCATIONS


def allocation_from(kind: str, settings: Mapping[str, Any]) -> AllocationConfig:
    """The allocation config of the flat form: ``kind`` and the settings by their keys (``allocation_lambda``,
    ``owl_m``, ``allocation_map``); a setting of another allocation must hold its default."""
    if kind not in ALLOCATION_CONFIGS:
        raise ConfigError(f"allocation must be one of {list(ALLOCATIONS)}, got {kind!r}")
    if (kind == "map") != (settings.get("allocation_map") is not None):
        raise ConfigError(f"allocation 'map' needs allocation_map (and only it uses one), got allocation="
                          f"{kind!r}, allocation_map={settings.get('allocation_map')!r}")
    cls = ALLOCATION_CONFIGS[kind]
    own = {option_key(f): f.name for f in dataclasses.fields(cls)}
    kwargs = {own[key]: value for key, value in settings.items() if key in own}
    for key, value in settings.items():
        if key not in own and value is not None and value != _flat_defaults()[key]:
            raise ConfigError(f"{key}={value!r} is a setting of another allocation than {kind!r}; drop it or "
                              f"choose that allocation")
    return cls(**kwargs)


def _allocation_dict(allocation: AllocationConfig) -> dict[str, Any]:
    return {"allocation": allocation.kind,
            **{option_key(f): getattr(allocation, f.name) for f in dataclasses.fields(allocation)}}


# -- method configs ----------------------------------------------------------------------------------------
@dataclass
class MethodConfig:
    """What every method takes; a method is a registered subclass (:func:`register_method`).

    Args:
        sparsity: fraction pruned per output row, in [0, 1) (default 0.5; N/M with ``pattern``).
        pattern: N:M semi-structured sparsity, e.g. '2:4' (default: unstructured).
        targets: the Linears to prune, named relative to each decoder block.
        layers: decoder layer indices to prune (default: all).
        propagate: the next layer's inputs: outputs of the 'pruned' or of the 'dense' layer.
        seed: seed of the random-visual pool.
        allocation: how the sparsity is spread over layers: ``Uniform()``, ``OWL(m, lmbda)`` or
            ``MapAllocation(path, lmbda)``.

    Raises:
        ConfigError: a value out of its range or choices (named with the value), or settings that contradict
            each other (a sparsity and a pattern that disagree, an allocation with a pattern).
    """

    sparsity: float | None = option(None, "fraction pruned per output row (default 0.5; N/M with --pattern)",
                                    within="[0, 1)")
    pattern: str | None = option(None, "N:M semi-structured sparsity, e.g. 2:4 (default: unstructured)")
    targets: tuple[str, ...] = option(DECODER_PROJ, "Linears to prune, relative to each decoder block")
    layers: tuple[int, ...] | None = option(None, "decoder layer indices to prune (default: all)")
    propagate: str = option("pruned", "next layer's inputs: outputs of the pruned or the dense layer",
                            choices=("pruned", "dense"))
    seed: int = option(0, "seed of the random-visual pool", within=SEED_RANGE)
    allocation: AllocationConfig = option(default_factory=Uniform, cli=False)  # Uniform() | OWL(...) | MapAllocation

    method: ClassVar[str] = ""                 # set by register_method
    scorer: ClassVar[str] = ""                 # registered scorer
    default_pool: ClassVar[str | None] = None  # registered pool (None: no calibration data)

    def __post_init__(self) -> None:
        if not self.method:
            raise ConfigError(f"{type(self).__name__} is not a registered method: decorate it with "
                              "@register_method(name, scorer=..., pool=...)")
        check_fields(self)
        self._check_calibration(get_scorer(self.scorer).needs)
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                                  f"(which prunes {implied:g}); pass sparsity={implied:g} or drop one")
            self.sparsity = implied
        elif self.sparsity is None:
            self.sparsity = 0.5
        self._check_targets()
        if not isinstance(self.allocation, tuple(ALLOCATION_CONFIGS.values())):
            raise ConfigError(f"allocation must be Uniform(), OWL(...) or MapAllocation(...), got {self.allocation!r}")
        if self.allocation.kind != "uniform" and nm is not None:
            raise ConfigError(f"allocation {self.allocation.kind!r} cannot be combined with pattern {self.pattern} "
                              "(N:M fixes the sparsity of every group of M weights); drop one of them")

    def _check_calibration(self, needs: str | None) -> None:
        if needs is not None:
            raise ConfigError(f"method {self.method!r}: scorer {self.scorer!r} needs calibration data, so the "
                              "method must name a default pool (register it on a CalibratedConfig)")

    def _check_targets(self) -> None:
        """At least one Linear name; none blank (``--targets ''`` would name the decoder block itself)."""
        names = [t for t in self.targets if isinstance(t, str) and t.strip()]
        if not names:
            got = "" if not self.targets else f" (got {list(self.targets)!r})"
            raise ConfigError(f"targets is empty{got}: name at least one Linear, e.g. 'mlp.down_proj'")
        if len(names) < len(self.targets):
            bad = next(t for t in self.targets if t not in names)
            raise ConfigError(f"targets holds {bad!r}, not a Linear name, in {list(self.targets)!r}; drop it")

    @property
    def pool(self) -> str | None:
        """The calibration pool (none: the method scores weights alone)."""
        return None

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        """The scorer uses activations, or the allocation does (owl's Wanda scores)."""
        return get_scorer(self.scorer).needs is not None or self.allocation.kind == "owl"

    @property
    def needs_mean_drift(self) -> bool:
        """The alpha rule's k depends on the mean drift of all samples at the layer."""
        return False

    @property
    def scorer_options(self) -> dict[str, Any]:
        """Keyword arguments of a weight-updating scorer (SparseGPT's blocksize and percdamp)."""
        return {}

    def pool_params(self, mean_drift: float | None, generator: torch.Generator | None) -> PoolParams:
        """What the pool function receives besides the tokens."""
        return PoolParams(mean_drift=mean_drift, generator=generator)

    # -- the flat form ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat form: ``method``, ``scorer`` and every setting by its command-line / recipe key."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "allocation"}
        return {"method": self.method, "scorer": self.scorer, **values, **_allocation_dict(self.allocation)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodConfig":
        """The config of a flat dict (``to_dict``'s, a recipe's keys); called on a method's class, the dict's
        method (default: that class's) must be that one."""
        data = dict(data)
        if cls.method:
            data.setdefault("method", cls.method)
        config = from_dict(data)
        if cls is not MethodConfig and not isinstance(config, cls):
            raise ConfigError(f"{cls.__name__} is method {cls.method!r}, but the settings name method "
                              f"{config.method!r}; load them with MethodConfig.from_dict")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MethodConfig":
        """The config of a recipe file (``recipe.yaml`` of ``atv prune``): see :func:`from_yaml`."""
        return cls.from_dict(read_yaml_settings(path))


@dataclass
class CalibratedConfig(MethodConfig):
    """A method that scores weights with activations: calibration tokens from a pool (any registered one).

    Settings: those of :class:`MethodConfig`, and:

    Args:
        pool: calibration pool (default: the method's own).
        alpha: ATV's alpha rule, k = round(min(1, alpha * mean drift) * n_text).
        visual_ratio: ATV's fixed rule instead of alpha, k = round(ratio * n_visual).

    Raises:
        ConfigError: a value out of its range or choices (named with the value), or settings that contradict
            each other (a sparsity and a pattern that disagree, an allocation with a pattern).
    """

    pool: str | None = option(None, "calibration pool (default: the method's)", choices=POOLS)
    alpha: float = option(1.0, "ATV alpha rule: k = round(min(1, alpha * mean drift) * n_text)", within="> 0")
    visual_ratio: float | None = option(None, "ATV fixed rule instead of alpha: k = round(ratio * n_visual)",
                                        within="[0, 1]")

    def _check_calibration(self, needs: str | None) -> None:
        if needs is None:
            raise ConfigError(f"method {self.method!r} uses no calibration data; register it on MethodConfig")
        self.pool = self.default_pool if self.pool is None else self.pool
        if self.pool is None:
            raise ConfigError(f"method {self.method!r}: scorer {self.scorer!r} needs calibration data, so the "
                              "method must name a default pool")
        pool = get_pool(self.pool)
        if self.visual_ratio is not None and not pool.needs_drift:
            drift_pools = " and ".join(repr(p) for p in sorted(POOLS) if POOLS[p].needs_drift)
            raise ConfigError(f"visual_ratio is used only by the {drift_pools} pools, not {self.pool!r}; "
                              "drop visual_ratio or choose one of those")

    @property
    def needs_mean_drift(self) -> bool:
        return get_pool(self.pool).needs_drift and self.visual_ratio is None

    def pool_params(self, mean_drift: float | None, generator: torch.Generator | None) -> PoolParams:
        return PoolParams(self.alpha, self.visual_ratio, mean_drift, generator)


@register_method("magnitude", scorer="magnitude", pool=None)
@dataclass
class MagnitudeConfig(MethodConfig):
    """|W| per output row; no calibration data.

    Settings: those of :class:`MethodConfig`.

    Raises:
        ConfigError: a value out of its range or choices (named with the value), or settings that contradict
            each other (a sparsity and a pattern that disagree, an allocation with a pattern).
    """


@register_method("wanda", scorer="wanda", pool="all")
@dataclass
class WandaConfig(CalibratedConfig):
    """Wanda: |W| x the input's norm, over every calibration token.

    Settings: those of :class:`CalibratedConfig`.

    Raises:
        ConfigError: a value out of its range or choices (named with the value), or settings that contradict
            each other (a sparsity and a pattern that disagree, an allocation with a pattern).
    """


@register_method("atv", scorer="wanda", pool="atv")
@dataclass
class ATVConfig(CalibratedConfig):
    """ATV-Pruning: Wanda's score over the text tokens and the visual tokens that drift most (``alpha`` rule,
    or ``visual_ratio``).

    Settings: those of :class:`CalibratedConfig`.

    Raises:
        ConfigError: a value out of its range or choices (named with the value), or settings that contradict
            each other (a sparsity and a pattern that disagree, an allocation with a pattern).
    """


@register_method("sparsegpt", scorer="sparsegpt", pool="all")
@dataclass
class SparseGPTConfig(CalibratedConfig):
    """SparseGPT: OBS-style pruning with the inverse Hessian, updating the kept weights.

    Settings: those of :class:`CalibratedConfig`, and:

    Args:
        blocksize: columns solved together (the reference's 128).
        percdamp: dampening added to the Hessian's diagonal, a fraction of its mean.

    Raises:
        ConfigError: a value out of its range or choices (named with the value), or settings that contradict
            each other (a sparsity and a pattern that disagree, an allocation with a pattern).
    """

    blocksize: int = option(128, "SparseGPT column block", within=">= 1")
    percdamp: float = option(0.01, "SparseGPT dampening, fraction of the mean Hessian diagonal", within="> 0")

    @property
    def scorer_options(self) -> dict[str, Any]:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp}


@register_method("tamp", scorer="wanda", pool="tamp")
@dataclass
class TAMPConfig(CalibratedConfig):
    """TAMP: Wanda's score over the tokens each Linear's attention weighs most (eager attention).

    Settings: those of :class:`CalibratedConfig`.

    Raises:
        ConfigError: a value out of its range or choices (named with the value), or settings that contradict
            each other (a sparsity and a pattern that disagree, an allocation with a pattern).
    """


# -- from the flat form ------------------------------------------------------------------------------------
def _flat_fields() -> dict[str, dataclasses.Field]:
    """Every setting of the flat form by its key, first declaration wins (common, then per method, then the
    allocations')."""
    found: dict[str, dataclasses.Field] = {}
    for cls in (MethodConfig, *METHOD_CONFIGS.values(), OWL, MapAllocation):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli"):
                found.setdefault(option_key(f), f)
    return found


def _flat_defaults() -> dict[str, Any]:
    return {key: f.default for key, f in _flat_fields().items()}


def from_dict(data: Mapping[str, Any]) -> MethodConfig:
    """The method config of a flat dict: ``method`` (default 'atv') picks the class, ``allocation`` with
    ``allocation_lambda`` / ``owl_m`` / ``allocation_map`` make its allocation, the other keys are its settings
    (keys with dashes or underscores). A setting of another method is accepted only at its default (the command
    line gives every option); an unknown key is refused by name.

    Args:
        data: the flat settings (``to_dict()``'s, a recipe's keys).

    Returns:
        The method's config, e.g. an :class:`ATVConfig`.

    Raises:
        ConfigError: an unknown method or key, a setting of another method away from its default, or a value
            out of its range.
    """
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    method = values.pop("method", DEFAULT_METHOD)
    cls = lookup("method", method, METHOD_CONFIGS)
    scorer = values.pop("scorer", None)
    if scorer is not None and scorer != cls.scorer:
        raise ConfigError(f"method {method!r} scores with {cls.scorer!r}, not scorer={scorer!r}; drop scorer")
    kind = values.pop("allocation", "uniform")
    spread = {key: values.pop(key) for key in ("allocation_lambda", "owl_m", "allocation_map") if key in values}
    if isinstance(kind, tuple(ALLOCATION_CONFIGS.values())):  # an allocation config given whole
        given = {k: v for k, v in spread.items() if v is not None and v != _flat_defaults()[k]}
        if given:
            raise ConfigError(f"allocation={kind!r} is given whole: drop {given} (or pass allocation by its name)")
        allocation = kind
    else:
        allocation = allocation_from(kind, spread)
    own = {f.name for f in dataclasses.fields(cls) if f.init} - {"allocation"}
    flat = _flat_fields()
    kwargs = {}
    for key, value in values.items():
        if key in own:
            kwargs[key] = value
        elif key not in flat:
            valid = sorted(own | {"method", "allocation", "allocation_lambda", "owl_m", "allocation_map"})
            raise ConfigError(f"unknown setting {key!r} of method {method!r}; valid: {valid}")
        elif value is not None and value != flat[key].default:
            if key == "pool":
                raise ConfigError(f"method {method!r} uses no calibration data; drop pool={value!r}")
            owners = sorted(name for name, c in METHOD_CONFIGS.items() if key in {f.name for f in
                                                                                   dataclasses.fields(c)})
            raise ConfigError(f"{key}={value!r} is a setting of method {' or '.join(map(repr, owners))}, not of "
                              f"{method!r}; drop it or choose that method")
    return cls(**kwargs, allocation=allocation)


def read_yaml_settings(path: str | Path) -> dict[str, Any]:
    """The prune settings of a YAML file (a recipe): its keys that name a setting of the flat form; the others
    (model, calib, nsamples, ... of the job that wrote it) are left out."""
    data = read_yaml_mapping(path)
    keys = {"method", "allocation", *_flat_fields()}
    return {k: v for k, v in data.items() if str(k).replace("-", "_") in keys}


def from_yaml(path: str | Path) -> MethodConfig:
    """The method config of a recipe (``recipe.yaml`` saved by ``atv prune``, or any YAML of flat settings)::

        config = from_yaml("pruned/recipe.yaml")   # e.g. ATVConfig(sparsity=0.6, alpha=0.5, ...)
        prune_(model, config, batches)

    Args:
        path: the YAML file.

    Returns:
        The method's config.

    Raises:
        ConfigError: the file is not a YAML mapping of settings, or :func:`from_dict` refuses them.
    """
    return from_dict(read_yaml_settings(path))


def method_config(config: "MethodConfig | PruneConfig") -> MethodConfig:
    """The per-method config of either form."""
    return config.resolved if isinstance(config, PruneConfig) else config


# -- the flat form as one dataclass ------------------------------------------------------------------------
def _flat_namespace() -> list[tuple[str, Any, dataclasses.Field]]:
    """PruneConfig's fields: method, then every setting of the built-in methods and allocations by its key, with
    its declaration (default, help, checks) taken from the config that owns it."""
    out = [("method", str, option(DEFAULT_METHOD, "preset naming a scorer and its default pool",
                                  choices=METHOD_CONFIGS))]
    hints: dict[str, Any] = {}
    for cls in (MethodConfig, *METHOD_CONFIGS.values(), OWL, MapAllocation):
        hints.update({option_key(f): f.type for f in dataclasses.fields(cls)})
    for key, f in _flat_fields().items():
        metadata = {**f.metadata, "key": None}
        default = None if f.default is dataclasses.MISSING else f.default  # allocation_map: only with 'map'
        if key == "owl_m":  # the allocation's kind, then its settings
            out.append(("allocation", str, option(
                "uniform", "sparsity per layer at the same global budget: the same everywhere, owl (outlier-"
                           "weighted, from the dense Wanda scores), or map (per layer and attention/FFN group from "
                           "--allocation-map)", choices=ALLOCATIONS)))
        out.append((key, hints[key], dataclasses.field(default=default, metadata=metadata)))
    out.append(("scorer", str, dataclasses.field(init=False, default="")))
    return out


def _flat_post_init(self: "PruneConfig") -> None:
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
    self.resolved = from_dict(values)  # every check of the method's config
    for f in dataclasses.fields(self.resolved):  # as resolved and converted: default pool, sparsity, tuples
        if f.name != "allocation":
            setattr(self, f.name, getattr(self.resolved, f.name))
    self.scorer, self.pool = self.resolved.scorer, self.resolved.pool
    if self.allocation_map is not None:
        self.allocation_map = str(self.allocation_map)


def _flat_getattr(self: "PruneConfig", name: str) -> Any:
    if name == "resolved" or name.startswith("__"):  # not made yet (unpickling, a failed __post_init__)
        raise AttributeError(name)
    return getattr(self.resolved, name)  # nm, needs_calibration, scorer_options, pool_params, ...


PruneConfig = dataclasses.make_dataclass(
    "PruneConfig", _flat_namespace(),
    namespace={"__module__": __name__, "__post_init__": _flat_post_init, "__getattr__": _flat_getattr,
               "to_dict": lambda self: self.resolved.to_dict(),
               "__doc__": "Every built-in method's settings in one flat dataclass, named as on the command line "
                          "and in recipes: ``PruneConfig('atv', sparsity=0.6)``. Checked by building its per-method "
                          "config, ``.resolved`` (an ATVConfig here), which the engine runs; a setting of "
                          "another method is refused unless it holds its default."})
"""Every built-in method's settings in one flat dataclass, named as on the command line and in recipes.

``PruneConfig("atv", sparsity=0.6)`` is checked by building its per-method config, ``.resolved`` (here an
:class:`ATVConfig`), which the engine runs; a setting of another method is refused unless it holds its default.
Its fields are those of :class:`MethodConfig`, :class:`CalibratedConfig`, :class:`SparseGPTConfig`,
:class:`OWL` and :class:`MapAllocation` by their command-line keys (``method``, ``sparsity``, ``pattern``,
``pool``, ``alpha``, ``visual_ratio``, ``blocksize``, ``percdamp``, ``allocation``, ``allocation_lambda``,
``owl_m``, ``allocation_map``, ...), generated from those classes so each default and help text is written once.
"""


# -- the method table of earlier versions ------------------------------------------------------------------
class _MethodTable(MutableMapping):
    """``METHODS[name] -> (scorer, default pool)``, a view of :data:`METHOD_CONFIGS` (deprecated: register a
    config class with :func:`register_method`; assigning an entry still registers a plain one)."""

    def __getitem__(self, name: str) -> tuple[str, str | None]:
        cls = METHOD_CONFIGS[name]
        return cls.scorer, cls.default_pool

    def __setitem__(self, name: str, entry: tuple[str, str | None]) -> None:
        warnings.warn("pruning.config.METHODS is deprecated: register a config class with @register_method",
                      DeprecationWarning, stacklevel=2)
        scorer, pool = entry
        current = METHOD_CONFIGS.get(name)
        if current is not None and (current.scorer, current.default_pool) == (scorer, pool):
            return  # the entry it already has (e.g. a saved copy put back): keep its own config class
        base = MethodConfig if pool is None else CalibratedConfig
        register_method(name, scorer=scorer, pool=pool)(dataclass(type(f"{name}Config", (base,), {})))

    def __delitem__(self, name: str) -> None:
        del METHOD_CONFIGS[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(METHOD_CONFIGS))

    def __len__(self) -> int:
        return len(METHOD_CONFIGS)


METHODS = _MethodTable()
