"""Layer-wise pruning of vision-language models: ATV-Pruning, Wanda, SparseGPT, magnitude, TAMP."""

from .adapters import DECODER_PROJ, Adapter, get_adapter, register_adapter
from .config import (
    OWL,
    ATVConfig,
    CalibratedConfig,
    MagnitudeConfig,
    MapAllocation,
    MethodConfig,
    PruneConfig,
    SparseGPTConfig,
    TAMPConfig,
    Uniform,
    WandaConfig,
    from_dict,
    from_yaml,
    register_method,
)
from .engine import PruneReport, compute_masks, prune_
from .errors import ToolkitError
from .execution import ExecutionConfig
from .registry import register_pool, register_scorer

__all__ = ["ATVConfig", "Adapter", "CalibratedConfig", "DECODER_PROJ", "ExecutionConfig", "MagnitudeConfig",
           "MapAllocation", "MethodConfig", "OWL", "PruneConfig", "PruneReport", "SparseGPTConfig", "TAMPConfig",
           "ToolkitError", "Uniform", "WandaConfig", "compute_masks", "from_dict", "from_yaml", "get_adapter",
           "prune_", "register_adapter", "register_method", "register_pool", "register_scorer"]
