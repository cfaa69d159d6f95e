"""How ClipGradOptimizer applies a step once its statistics are known: the fused kernel's
grad_scale / found_inf, or the in-place scale followed by the inner step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradstats._core import GradStats, group_by_device_and_dtype, local_tensors
from gradstats.plan import GradPlan

# Fused kernels divide by grad_scale = 1 / coef in float32: a coefficient below this (a norm
# beyond ~1e30 x max_norm) is applied in place first, so that grad_scale stays finite.
_TINY_COEF = 2.0**-100


@dataclass(frozen=True)
class StepMode:
    """How one step runs, decided before anything changes."""

    policy: str  # on_nonfinite, or "skip" under a GradScaler (its overflow means skip)
    fused: bool  # the inner optimizer reads grad_scale / found_inf (fused Adam, AdamW, SGD...)
    loss_scale: Tensor | None  # GradScaler's scale still in the gradients
    scaler_found: Tensor | None  # GradScaler's overflow flag
    adaptive: bool  # the threshold is an AdaptiveClip's

    @property
    def skips(self) -> bool:
        return self.policy == "skip"

    @property
    def wide(self) -> bool:
        """Whether the coefficient is computed here rather than by the kernel (a loss scale to
        divide out, an adaptive threshold on the device): then the statistics come in float64."""
        return self.loss_scale is not None or self.adaptive


@torch.compiler.disable
def step_with_grad_scale(
    optimizer: Optimizer,
    grad_scale: Tensor,
    found_inf: Tensor | None,
    closure: Callable[[], Any] | None,
) -> None:
    """optimizer.step() with the grad_scale/found_inf attributes that fused optimizers read.

    Kept out of torch.compile graphs: dynamo (torch 2.14) inlines the inner step without the
    attributes set in the same compiled region (the step then neither clips nor skips), and fails
    on deleting them. The fused step is one kernel launch per device, so nothing is lost.
    """
    optimizer.grad_scale = grad_scale
    optimizer.found_inf = found_inf
    try:
        inner_step(optimizer, closure)
    finally:
        del optimizer.grad_scale
        del optimizer.found_inf


def inner_step(optimizer: Optimizer, closure: Callable[[], Any] | None) -> None:
    optimizer.step() if closure is None else optimizer.step(closure)


def fused_step(
    optimizer: Optimizer,
    plan: GradPlan,
    stats: GradStats,
    mode: StepMode,
    device_skip: Tensor | None,
    closure: Callable[[], Any] | None,
) -> None:
    """Hands the clip (and the loss scale) to the fused kernel, which divides the gradients by
    grad_scale and returns early where found_inf is set (device_skip: None when the host has
    decided already that the step is taken)."""
    coef = stats.clip_coef.to(torch.float32)
    kept = torch.clamp(coef, min=_TINY_COEF)
    if mode.policy in ("zero", "propagate"):
        # The rest of a coefficient below _TINY_COEF, and the zeroing, in place (the scale
        # kernel touches nothing when the factor is 1 and nothing is zeroed); "skip" and
        # "error" never step on a non-finite norm, so their coefficient is never that small.
        zero = stats.nonfinite if mode.policy == "zero" else None
        plan.apply_clip(coef / kept, zero)
    grad_scale = torch.reciprocal(kept)
    if mode.loss_scale is not None:
        grad_scale = grad_scale * mode.loss_scale.to(coef.device, torch.float32)
    skip_flag = None if device_skip is None else device_skip.to(torch.float32)
    step_with_grad_scale(optimizer, grad_scale, skip_flag, closure)


def inplace_step(
    optimizer: Optimizer,
    plan: GradPlan,
    stats: GradStats,
    mode: StepMode,
    closure: Callable[[], Any] | None,
) -> None:
    if mode.loss_scale is None:
        zero = stats.nonfinite if mode.policy == "zero" else None
        plan.apply_clip(stats.clip_coef, zero)
    else:
        # Unscaling must multiply even when the factor is >= 1, which the fused scale skips.
        coef = stats.clip_coef
        factor = coef / mode.loss_scale.to(coef.device, coef.dtype)
        for group in group_by_device_and_dtype(local_tensors(plan.grads())):
            torch._foreach_mul_(group, factor.to(group[0].device))
    inner_step(optimizer, closure)
