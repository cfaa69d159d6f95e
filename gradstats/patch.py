"""patch_torch(): torch.nn.utils' clipping functions replaced by gradstats', for code that calls
torch's own (training frameworks: accelerate, Lightning's precision plugins, user scripts).

    gradstats.patch_torch()              # from here on, for the whole process
    with gradstats.patch_torch():        # or for a block only
        trainer.train()
    gradstats.unpatch_torch()            # torch's functions back, exactly

Patches are layers on a stack, so that two libraries (or a library and a user) can each apply
one and end it whenever they like, nested or not:

- the functions in place are those of the newest active patch (for the names it replaces);
- restore() removes only its own layer: restoring the newest puts back what it replaced (the
  layer below, or what was there before any patch); restoring an older one changes nothing in
  place, and the patch above it now sits on what the older one had replaced;
- a function someone else installed by hand is kept: restore() writes a name only where it still
  holds that patch's function, and a hand-installed function under a later patch comes back when
  that patch ends;
- unpatch_torch() ends every patch (each one's `active` is then False) and puts torch's back.

Callers look the functions up at call time (`torch.nn.utils.clip_grad_norm_(...)`), so replacing
the module attributes reroutes them; a name imported before the patch (`from torch.nn.utils import
clip_grad_norm_`) keeps torch's function. torch.compile traces whichever function the attribute
holds when it compiles, and recompiles when it changes.
"""

from __future__ import annotations

import threading
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


# The active patches, oldest first; the lock keeps threads that apply and end patches from
# interleaving their reads and writes of the stack and the functions.
_LAYERS: list[TorchPatch] = []
_LOCK = threading.RLock()


def _install(functions: dict[Slot, Any]) -> None:
    for (module, attr), function in functions.items():
        setattr(module, attr, function)


def _current() -> dict[Slot, Any]:
    return {slot: getattr(*slot) for slot in _TORCH}


class TorchPatch:
    """An applied patch_torch(), one layer on the stack of patches (see the module's docstring).
    As a context manager, its exit (or restore()) removes its layer."""

    def __init__(self, functions: dict[str, Callable[..., Any]]) -> None:
        self._installed = {slot: functions[name] for name in functions for slot in _slots(name)}
        with _LOCK:
            # What this patch replaced, per name: put back when it is the newest and ends, or
            # handed to the patch above it when it ends below that one.
            self._below = _current()
            _LAYERS.append(self)
            _install(self._installed)

    @property
    def active(self) -> bool:
        """Whether this patch is still a layer: neither restore() nor unpatch_torch() has ended
        it."""
        return any(layer is self for layer in _LAYERS)

    def restore(self) -> None:
        """Removes this patch's layer (once; later calls do nothing): the newest patch puts back
        what it replaced; an older one leaves the functions in place as they are."""
        with _LOCK:
            at = next((i for i, layer in enumerate(_LAYERS) if layer is self), None)
            if at is None:
                return
            del _LAYERS[at]
            if at < len(_LAYERS):
                above = _LAYERS[at]
                for slot, function in self._installed.items():
                    if above._below[slot] is function:
                        above._below[slot] = self._below[slot]
                return
            _install(
                {
                    slot: self._below[slot]
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
        return f"TorchPatch({'active' if self.active else 'restored'}: {names})"


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
    back on exit what was there before. Calling it again adds a layer with the same functions;
    ending patches in any order leaves the newest active one's functions in place (the module's
    docstring); unpatch_torch() restores torch's functions whatever was patched. A keyword
    installs another function under that name instead of gradstats' (the integrations install a
    clip_grad_norm_ that also keeps the step's statistics); it must take the same arguments as
    torch's.
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
    the very objects that were there before gradstats patched anything, and ends every patch."""
    with _LOCK:
        _LAYERS.clear()
        _install(_TORCH)
