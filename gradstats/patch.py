"""patch_torch(): torch.nn.utils' clipping functions replaced by gradstats', for code that calls
torch's own (training frameworks: accelerate, Lightning's precision plugins, user scripts).

    gradstats.patch_torch()              # from here on, for the whole process
    with gradstats.patch_torch():        # or for a block only
        trainer.train()
    gradstats.unpatch_torch()            # torch's functions back, exactly

Callers look the functions up at call time (`torch.nn.utils.clip_grad_norm_(...)`), so replacing
the module attributes reroutes them; a name imported before the patch (`from torch.nn.utils import
clip_grad_norm_`) keeps torch's function. torch.compile traces whichever function the attribute
holds when it compiles, and recompiles when it changes.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch.nn.utils
import torch.nn.utils.clip_grad

from gradstats.clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

# The functions patch_torch() replaces, with gradstats' versions.
GRADSTATS_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "clip_grad_norm_": clip_grad_norm_,
    "get_total_norm": get_total_norm,
    "clip_grads_with_norm_": clip_grads_with_norm_,
    "clip_grad_value_": clip_grad_value_,
}

# Where torch keeps them: torch.nn.utils exports each under its public name; its implementation
# module, torch.nn.utils.clip_grad, holds get_total_norm and clip_grads_with_norm_ under a private
# name ("_get_total_norm"), which its clip_grad_norm_ calls. Every one of the two spellings that
# exists is replaced.
_MODULES: tuple[types.ModuleType, ...] = (torch.nn.utils, torch.nn.utils.clip_grad)

Slot = tuple[types.ModuleType, str]


def _slots(name: str) -> list[Slot]:
    return [
        (module, attr)
        for module in _MODULES
        for attr in (name, "_" + name)
        if hasattr(module, attr)
    ]


# torch's functions, as found when gradstats was imported (before any patch of ours).
_TORCH: dict[Slot, Any] = {
    slot: getattr(*slot) for name in GRADSTATS_FUNCTIONS for slot in _slots(name)
}


def _install(functions: dict[Slot, Any]) -> None:
    for (module, attr), function in functions.items():
        setattr(module, attr, function)


def _current() -> dict[Slot, Any]:
    return {slot: getattr(*slot) for slot in _TORCH}


class TorchPatch:
    """An applied patch_torch(). As a context manager, its exit (or restore()) puts back the
    functions that were in place before it: torch's, or those of an enclosing patch. A function
    replaced again since (by a later patch, or unpatch_torch()) is left as it is."""

    def __init__(self, functions: dict[str, Callable[..., Any]]) -> None:
        self._previous = _current()
        self._installed = {slot: functions[name] for name in functions for slot in _slots(name)}
        self._active = True
        _install(self._installed)

    @property
    def active(self) -> bool:
        """Whether restore() has yet to run."""
        return self._active

    def restore(self) -> None:
        """Puts back what this patch replaced (once; later calls do nothing)."""
        if not self._active:
            return
        self._active = False
        _install(
            {
                slot: self._previous[slot]
                for slot, function in self._installed.items()
                if getattr(*slot) is function
            }
        )

    def __enter__(self) -> TorchPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        names = ", ".join(f"{module.__name__}.{attr}" for module, attr in self._installed)
        return f"TorchPatch({'active' if self._active else 'restored'}: {names})"


def patch_torch(
    *,
    clip_grad_norm_: Callable[..., Any] | None = None,
    get_total_norm: Callable[..., Any] | None = None,
    clip_grads_with_norm_: Callable[..., Any] | None = None,
    clip_grad_value_: Callable[..., Any] | None = None,
) -> TorchPatch:
    """Replaces clip_grad_norm_, get_total_norm, clip_grads_with_norm_ and clip_grad_value_ in
    torch.nn.utils and torch.nn.utils.clip_grad with gradstats' versions (same signatures, the
    differences listed in gradstats.clip), so that code calling torch's clips through gradstats.

    A one-line global call, or a context manager (`with gradstats.patch_torch(): ...`) that puts
    back on exit what was there before. Calling it again changes nothing; unpatch_torch() restores
    torch's functions whatever was patched. A keyword installs another function under that name
    instead of gradstats' (the integrations install a clip_grad_norm_ that also keeps the step's
    statistics); it must take the same arguments as torch's.
    """
    chosen = {
        "clip_grad_norm_": clip_grad_norm_,
        "get_total_norm": get_total_norm,
        "clip_grads_with_norm_": clip_grads_with_norm_,
        "clip_grad_value_": clip_grad_value_,
    }
    for name, function in chosen.items():
        if function is not None and not callable(function):
            raise TypeError(
                f"patch_torch: {name} must be a function; got {type(function).__name__}"
            )
    return TorchPatch(
        {name: function or GRADSTATS_FUNCTIONS[name] for name, function in chosen.items()}
    )


def unpatch_torch() -> None:
    """Puts torch's own clipping functions back in torch.nn.utils and torch.nn.utils.clip_grad,
    the very objects that were there before gradstats patched anything."""
    _install(_TORCH)
