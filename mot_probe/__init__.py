"""The MoT sensitivity probe: text/visual pathway surgery, per-path pruning and the probe study."""

from .experts import RoutedExperts
from .routing import PATHS, ModalityRouter, RoutedLinear
from .surgery import PROBE_POOLS, MoTProbe, ProbeError, attach_probe_, get_probe, probe_pool

__all__ = ["PATHS", "PROBE_POOLS", "ModalityRouter", "MoTProbe", "ProbeError", "RoutedExperts", "RoutedLinear",
           "attach_probe_", "get_probe", "probe_pool"]
