"""GradMonitor's flight recorder: the steps that led to the first NaN/Inf or exploding step, kept on
the device beyond the window, written by dump() or by itself with dump_dir."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monitor_helpers import NAN, RTOL, host_reads_forbidden, set_grads, small_mlp

from gradstats import GradMonitor

WINDOW = 16
# The flight recorder keeps at most half the window (it copies every half window).
KEPT = WINDOW // 2


def norms_at(step: int) -> float:
    return 1.0 + step % 3


def run(steps: int, bad_step: int | None = None, kind: str = "nan", **kwargs) -> GradMonitor:
    """Constant gradients of known norm; at bad_step a NaN gradient, a NaN input or a huge norm."""
    model = small_mlp()
    monitor = GradMonitor(model, window=WINDOW, **kwargs)
    for step in range(steps):
        x = torch.randn(4, 4) + step
        if step == bad_step and kind == "input":
            x[1, 2] = NAN
        model(x)
        set_grads(model, 1e9 if step == bad_step and kind == "explode" else norms_at(step))
        if step == bad_step and kind == "nan":
            model[0].bias.grad[0] = NAN
        monitor.step()
    return monitor


def test_the_first_nan_gradient_is_kept_beyond_the_window(tmp_path):
    monitor = run(100, bad_step=40)
    assert monitor.history().steps[0] > 40, "the ring no longer holds the step"
    data = json.loads(monitor.dump(tmp_path / "flight.json").read_text())
    trigger = data["trigger"]
    assert (trigger["step"], trigger["reason"]) == (40, "nonfinite_gradients")
    assert trigger["steps"] == list(range(40 - KEPT + 1, 41))
    flight = data["flight"]
    # Each of the four parameters has norm norms_at(step): the total is twice that.
    expected = [2 * norms_at(s) for s in trigger["steps"][:-1]]
    np.testing.assert_allclose(flight["total_norm"][:-1], expected, rtol=RTOL)
    assert flight["grad_nan"][-1][flight["parameters"].index("0.bias")] == 1
    (features,) = flight["inputs"].values()
    # The input at step 40 was randn + 40: its features' means sit near 40.
    assert all(35 < m < 45 for m in features["mean"])
    assert "NaN/Inf gradients at step 40" in data["report"]
    assert any(f["cause"] == "nonfinite_gradients" for f in data["findings"])


def test_a_later_nan_does_not_replace_the_first(tmp_path):
    monitor = run(60, bad_step=20)
    data = json.loads(monitor.dump(tmp_path / "f.json").read_text())
    assert data["trigger"]["step"] == 20


def test_a_trigger_since_the_last_check_is_found_in_the_rings(tmp_path):
    monitor = run(WINDOW + 3, bad_step=WINDOW + 1, kind="input")
    data = json.loads(monitor.dump(tmp_path / "f.json").read_text())
    assert (data["trigger"]["step"], data["trigger"]["reason"]) == (
        WINDOW + 1,
        "nonfinite_activations",
    )
    (features,) = data["flight"]["inputs"].values()
    assert features["nan"] == [0, 0, 1, 0]


def test_an_exploding_step_trips_the_recorder(tmp_path):
    monitor = run(50, bad_step=30, kind="explode")
    data = json.loads(monitor.dump(tmp_path / "f.json").read_text())
    assert (data["trigger"]["step"], data["trigger"]["reason"]) == (30, "exploding_gradients")
    assert data["flight"]["total_norm"][-1] == pytest.approx(2e9, rel=RTOL)


def test_healthy_runs_have_no_trigger(tmp_path):
    monitor = run(40)
    data = json.loads(monitor.dump(tmp_path / "f.json").read_text())
    assert data["trigger"] is None and data["flight"] is None
    assert "No problem found" in data["report"]


def test_dump_dir_writes_by_itself_and_the_report_names_the_file(tmp_path):
    monitor = run(70, bad_step=25, dump_dir=tmp_path)
    assert monitor.dumped is None  # nothing read back yet: no sync, no file
    report = monitor.report()
    path = tmp_path / "gradmonitor_step25.json"
    assert monitor.dumped == path and path.exists()
    assert f"Flight record (the steps that led there): {path}" in report
    pytest.importorskip("matplotlib")
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_dump_dir_writes_on_close(tmp_path):
    monitor = run(10, bad_step=3, dump_dir=tmp_path)
    monitor.close()
    assert (tmp_path / "gradmonitor_step3.json").exists()


def test_dump_dir_without_a_trigger_writes_nothing(tmp_path):
    monitor = run(20, dump_dir=tmp_path)
    monitor.report()
    monitor.close()
    assert monitor.dumped is None and not list(tmp_path.iterdir())


def test_the_recorder_adds_no_host_read():
    model = small_mlp()
    monitor = GradMonitor(model, window=WINDOW, watch_modules="all")
    with host_reads_forbidden():
        for step in range(3 * WINDOW):
            model(torch.randn(4, 4))
            set_grads(model, math.nan if step == WINDOW else 1.0)
            monitor.step()
    assert monitor.num_steps == 3 * WINDOW


def _full_disk(monkeypatch, errno_code: int, written_share: float) -> None:
    """Every Path.write_text writes this share of its text, then fails as a full disk (ENOSPC) or a
    read-only mount (EROFS) does."""
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        real(self, data[: int(len(data) * written_share)], *args, **kwargs)
        raise OSError(errno_code, os.strerror(errno_code), str(self))

    monkeypatch.setattr(Path, "write_text", write_text)


def _assert_failed_once(monitor: GradMonitor, dump_dir: Path, why: str) -> None:
    """Every read-back works while the flight record cannot be written; one warning says why, and
    no file (partial, empty or temporary) is left behind."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = monitor.report()
        monitor.scalars()
        monitor.diagnose()
        monitor.history()
        monitor.close()
    said = [str(w.message) for w in caught if "flight record" in str(w.message)]
    assert len(said) == 1, said
    assert why in said[0] and "gradmonitor_step3.json" in said[0]
    assert monitor.dumped is None
    assert "NaN/Inf gradients at step 3" in report
    assert f"Flight record not written: {dump_dir / 'gradmonitor_step3.json'}" in report
    assert not dump_dir.exists() or not list(dump_dir.iterdir())


@pytest.mark.parametrize(("errno_code", "written_share"), [(errno.ENOSPC, 0.5), (errno.EROFS, 0.0)])
def test_a_full_disk_or_read_only_mount_leaves_no_file_and_warns_once(
    tmp_path, monkeypatch, errno_code, written_share
):
    monitor = run(10, bad_step=3, dump_dir=tmp_path)
    _full_disk(monkeypatch, errno_code, written_share)
    _assert_failed_once(monitor, tmp_path, os.strerror(errno_code))


def test_a_dump_dir_under_a_file_warns_once(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    dump_dir = tmp_path / "file" / "monitor"
    _assert_failed_once(run(10, bad_step=3, dump_dir=dump_dir), dump_dir, "Not a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_dump_dir_warns_once(tmp_path):
    dump_dir = tmp_path / "monitor"
    dump_dir.mkdir()
    dump_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        _assert_failed_once(run(10, bad_step=3, dump_dir=dump_dir), dump_dir, "Permission denied")
    finally:
        dump_dir.chmod(stat.S_IRWXU)


def test_an_explicit_dump_on_a_full_disk_raises_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monitor = run(10, bad_step=3)
    _full_disk(monkeypatch, errno.ENOSPC, 0.5)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        monitor.dump(tmp_path / "flight.json")
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_plotting_keeps_the_record_and_no_partial_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(Figure, "savefig", savefig)
    monitor = run(10, bad_step=3, dump_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="gradmonitor_step3.png"):
        monitor.report()
    path = tmp_path / "gradmonitor_step3.json"
    assert monitor.dumped == path
    assert json.loads(path.read_text())["trigger"]["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
