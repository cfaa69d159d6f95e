"""What the monitor's hooks watch: the floating-point tensors inside a module's inputs and outputs,
and the modules named by watch_modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

from torch import Tensor, nn

from gradstats.monitor.report import NAMED_AT_MOST

WatchModules = Union[str, Sequence[Union[str, nn.Module]], None]
# The root module's output, when watched, is called this; the model's inputs "input[...]".
OUTPUT_SITE = "output"
INPUT_SITE = "input"


def floating_leaves(name: str, obj: Any, out: list[tuple[str, Tensor]]) -> None:
    """The floating-point (and complex) tensors in nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            out.append((name, obj))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            floating_leaves(f"{name}[{i}]" if name.startswith(INPUT_SITE) else name, item, out)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            floating_leaves(f"{name}[{key}]" if name.startswith(INPUT_SITE) else name, item, out)


def resolve_modules(model: nn.Module, watch: WatchModules) -> list[tuple[str, nn.Module]]:
    if watch is None:
        return []
    named = list(model.named_modules())
    if isinstance(watch, str):
        if watch != "all":
            raise ValueError(
                f"watch_modules must be None, 'all' or a list of module names or modules; got "
                f"{watch!r}"
            )
        leaves = [(n or OUTPUT_SITE, m) for n, m in named if next(m.children(), None) is None]
        return leaves
    by_name = dict(named)
    by_id = {id(m): n for n, m in named}
    out = []
    for item in watch:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"watch_modules: {type(item).__name__} is not part of the model")
            name = by_id[id(item)]
        elif isinstance(item, str):
            if item not in by_name:
                known = ", ".join(repr(n) for n, _ in named[1 : 1 + NAMED_AT_MOST])
                raise ValueError(f"watch_modules: no module named {item!r} (modules: {known}, ...)")
            name = item
        else:
            raise TypeError(f"watch_modules: expected module names or modules; got {type(item)}")
        out.append((name or OUTPUT_SITE, by_name[name]))
    return out
