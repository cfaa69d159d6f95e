"""Test setup: GPU tests are marked and skipped, at run time, where no CUDA device is present.

Nothing here queries CUDA at import or collection time.
"""

import importlib.metadata
from collections import Counter

import pytest
import torch

# The frameworks whose releases the integration tests run against: their versions head the run,
# so that a failure after a new release names that release.
FRAMEWORKS = ("torch", "transformers", "accelerate", "lightning")


def framework_versions() -> str:
    versions = []
    for name in FRAMEWORKS:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return "gradstats tested against: " + ", ".join(versions)


def pytest_report_header(config):
    return framework_versions()


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if item.get_closest_marker("multi_gpu") is not None and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """The framework versions (pytest -q hides the header), then why cases were skipped, counted
    by reason (pytest's summary line gives only the total)."""
    terminalreporter.write_line(framework_versions())
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.write_sep("-", "why cases were skipped")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:5d} skipped: {reason}")
