"""The check CI runs on an installed gradstats (a wheel, an sdist build, an editable install), from
outside the source tree: it imports, says where from, and clips like torch.

    python tests/install_check.py [--not-under DIR]

--not-under DIR fails when the imported package lies under DIR (the source tree: the point is to
test the installed copy, not the checkout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import gradstats

MAX_NORM = 1.0
# float32 norms: gradstats sums in float64, torch in float32.
RTOL = 1e-5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--not-under", type=Path, help="the package must not come from here")
    args = parser.parse_args()
    where = Path(gradstats.__file__).resolve().parent
    print(f"gradstats {gradstats.__version__} from {where}")
    print(f"build: {gradstats.BUILD_INFO}; kernels: {gradstats.kernel_devices()}")
    if args.not_under is not None and where.is_relative_to(args.not_under.resolve()):
        print(f"FAILED: imported from the source tree {args.not_under}, not the installed copy")
        return 1

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in ((64, 32), (32,), (0,), (5, 7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    norm = gradstats.clip_grad_norm_(ours, MAX_NORM)
    want = torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM)
    torch.testing.assert_close(norm, want, rtol=RTOL, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=RTOL, atol=1e-7)
    stats = gradstats.grad_stats(ours, max_norm=MAX_NORM).to_dict()
    print(f"clip_grad_norm_ matches torch: norm {norm.item():.6f}; stats {stats['total_norm']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
