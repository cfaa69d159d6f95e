"""gradstats: fused gradient statistics and clipping for PyTorch.

One pass over every gradient gives the global and per-tensor norms, the NaN/Inf counts and the clip
coefficient; a second, in-place pass clips, and skips itself on the device when nothing needs it.
"""

from gradstats._build import BuildError, kept_for_main
from gradstats._version import __version__

# A library that cannot load raises BuildError here, except under `python -m gradstats`, whose
# `info` then reports it (gradstats._build).
with kept_for_main():
    from gradstats import distributed
    from gradstats._core import GradStats
    from gradstats.clip import (
        clip_grad_norm_,
        clip_grad_value_,
        clip_grads_with_norm_,
        get_total_norm,
    )
    from gradstats.monitor import Finding, GradMonitor, MonitorHistory, MonitorThresholds
    from gradstats.ops import BUILD_INFO, kernel_devices
    from gradstats.optim import AdaptiveClip, ClipGradOptimizer
    from gradstats.patch import TorchPatch, patch_torch, unpatch_torch
    from gradstats.plan import GradPlan
    from gradstats.stats import count_nonfinite, grad_stats

__all__ = [
    "BUILD_INFO",
    "AdaptiveClip",
    "BuildError",
    "ClipGradOptimizer",
    "Finding",
    "GradMonitor",
    "GradPlan",
    "GradStats",
    "MonitorHistory",
    "MonitorThresholds",
    "TorchPatch",
    "__version__",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "count_nonfinite",
    "distributed",
    "get_total_norm",
    "grad_stats",
    "kernel_devices",
    "patch_torch",
    "unpatch_torch",
]
