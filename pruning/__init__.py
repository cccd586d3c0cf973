"""Layer-wise pruning of vision-language models: ATV-Pruning, Wanda, SparseGPT, magnitude, TAMP."""

from .adapters import DECODER_PROJ, Adapter, get_adapter, register_adapter
from .config import PruneConfig
from .engine import PruneReport, compute_masks, prune_
from .errors import ToolkitError
from .execution import ExecutionConfig
from .registry import register_pool, register_scorer

__all__ = ["Adapter", "DECODER_PROJ", "ExecutionConfig", "PruneConfig", "PruneReport", "ToolkitError", "compute_masks",
           "get_adapter", "prune_", "register_adapter", "register_pool", "register_scorer"]
