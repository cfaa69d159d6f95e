"""What the monitor's hooks watch: the floating-point tensors inside a module's inputs and outputs,
and the modules named by watch_modules."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from gradstats import ops
from gradstats.monitor.report import NAMED_AT_MOST

WatchModules = Union[str, Sequence[Union[str, nn.Module]], None]
# The root module's output, when watched, is called this; the model's inputs "input[...]".
OUTPUT_SITE = "output"
INPUT_SITE = "input"
# Sparse layouts whose stored values are read with .values().
_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)
# Distinct inputs and outputs watched at most: names come from the data (dict keys of the inputs),
# and a stream of new keys must not grow the buffers without bound.
MAX_SITES = 1024
# Per-feature statistics: "auto" feature dimension by number of dimensions (the op reads the
# dtypes of ops.SUPPORTED_DTYPES), and the most features an input may have (its ring holds
# window x 7 x F float64).
_AUTO_FEATURE_DIM = {2: -1, 3: -1, 4: 1, 5: 1}
MAX_FEATURES = 1024
# Values that hold no tensor: the input watch skips them without a note.
_HOLD_NO_TENSOR = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    enum.Enum,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)
# What the watch looks into, said in the note about what it did not.
_READ = "tensors are read inside tuples, lists, dicts, dataclasses and namedtuples"
# An error caught in a hook is quoted up to this many characters in the report.
_ERROR_CHARS = 160
# Notes kept about what was not watched (distinct site and reason pairs).
_MAX_NOTES = 32


def floating_leaves(
    name: str, obj: Any, out: list[tuple[str, Tensor]], unread: list[tuple[str, str]]
) -> None:
    """The floating-point (and complex) tensors in nested tuples, lists, dicts (any Mapping),
    dataclasses and namedtuples, named by position, key or field (for inputs; a module output's
    tensors all take the module's name). Objects of other types may hold tensors the monitor
    cannot see: each goes to unread as (name, why), so that the report says so rather than
    nothing; values that hold no tensor (None, numbers, strings, ...) are skipped silently."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            out.append((name, obj))
        return
    if isinstance(obj, _HOLD_NO_TENSOR):
        return
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # a namedtuple
        items = zip(type(obj)._fields, obj)
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif isinstance(obj, Mapping):
        items = obj.items()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    else:
        unread.append((name, f"not watched: type {type(obj).__qualname__} is not read ({_READ})"))
        return
    for key, item in items:
        floating_leaves(
            f"{name}[{key}]" if name.startswith(INPUT_SITE) else name, item, out, unread
        )


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


def readable_parts(t: Tensor) -> tuple[list[Tensor], str | None]:
    """The dense tensors through which the monitor reads t, and why it cannot when it cannot.

    Sparse tensors are read through their stored values (the implicit zeros are neither NaN/Inf nor
    large); nested tensors through their packed values (jagged) or their components (strided).
    """
    if t.is_nested:
        return ([t.values()] if t.layout == torch.jagged else list(t.unbind())), None
    if t.layout == torch.sparse_coo:
        return [t._values()], None
    if t.layout in _COMPRESSED:
        return [t.values()], None
    if t.layout != torch.strided:
        return [], f"layout {t.layout} has no values the monitor can read"
    if t.device.type == "meta":
        return [], "a meta tensor holds no values"
    return [t], None


def dense_values(grad: Tensor) -> Tensor:
    """A gradient as the fused op reads it: a sparse one (nn.Embedding(sparse=True)) through the
    values of its coalesced form, whose norm is the gradient's norm."""
    if grad.layout == torch.sparse_coo:
        return grad.coalesce().values()
    if grad.layout in _COMPRESSED:
        return grad.values()
    return grad


def failed(exc: Exception) -> str:
    """A note for an error the monitor caught: its type and first line, shortened."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > _ERROR_CHARS:
        first = first[:_ERROR_CHARS] + "..."
    return f"the monitor's hook failed ({type(exc).__name__}: {first}); the call was not recorded"


class Notes:
    """What the monitor could not watch, and errors its hooks caught, each said once per site with
    how often it happened; at most _MAX_NOTES sites are named (a count says how many more)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], int] = {}
        self.dropped = 0

    def add(self, site: str, why: str) -> None:
        key = (site, why)
        if key in self._seen:
            self._seen[key] += 1
        elif len(self._seen) < _MAX_NOTES:
            self._seen[key] = 1
        else:
            self.dropped += 1

    def lines(self) -> tuple[str, ...]:
        out = [
            f"{site}: {why}" + (f" ({times} times)" if times > 1 else "")
            for (site, why), times in self._seen.items()
        ]
        if self.dropped:
            out.append(f"... and {self.dropped} more")
        return tuple(out)


def feature_dim(t: Tensor, setting: int | str | None) -> int | None:
    """The dimension of t that holds its features, or None when per-feature statistics do not
    apply: "auto" takes the last dimension of tabular [batch, features] and sequence [batch, time,
    features] inputs and the channels of images ([N, C, H, W], [N, C, D, H, W]); an int names it."""
    if setting is None or t.dtype not in ops.SUPPORTED_DTYPES or t.layout != torch.strided:
        return None
    if setting == "auto":
        return _AUTO_FEATURE_DIM.get(t.dim())
    return setting if -t.dim() <= setting < t.dim() and t.dim() > 1 else None


def check_feature_dim(setting: int | str | None) -> int | str | None:
    if setting is None or setting == "auto":
        return setting
    if isinstance(setting, bool) or not isinstance(setting, int):
        raise ValueError(f"feature_dim must be 'auto', None or an integer; got {setting!r}")
    return setting
