"""Host reads: the Tensor methods that copy a value to the host (on a GPU, each waits for the
device), replaced for a while to count them (the monitor benchmark, the tests) or to forbid them."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")

Method = Callable[..., object]


@contextlib.contextmanager
def replaced_host_reads(wrap: Callable[[str, Method], Method]) -> Iterator[None]:
    """Tensor.<name> is wrap(name, original) for every host read while this is active."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name, method in saved.items():
            setattr(torch.Tensor, name, wrap(name, method))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def counting_host_reads() -> Iterator[Counter[str]]:
    """Counts every host read, by anyone, per method name."""
    counts: Counter[str] = Counter()

    def counted(name: str, method: Method) -> Method:
        def read(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)

        return read

    with replaced_host_reads(counted):
        yield counts
