"""L4: optimizer wrappers that fold clipping and non-finite handling into step()."""

from gradstats.optim.adaptive import AdaptiveClip
from gradstats.optim.clip_optimizer import STATE_KEY, ClipGradOptimizer, StepMonitor

__all__ = ["STATE_KEY", "AdaptiveClip", "ClipGradOptimizer", "StepMonitor"]
