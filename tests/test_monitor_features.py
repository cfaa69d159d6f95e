"""GradMonitor's per-feature input statistics and the bad-input kinds they find: missing values,
unscaled features, outliers; and no false alarm on healthy training with real data sets."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from helpers import DEVICES
from monitor_helpers import NAN, host_reads_forbidden, load_example, small_mlp
from torch import nn

from gradstats import GradMonitor, MonitorThresholds

# Relative tolerance of per-feature means and RMS (float64 sums of float32 values) against numpy.
FEATURE_RTOL = 1e-9


def bad_inputs(monitor: GradMonitor) -> list:
    return [f for f in monitor.diagnose() if f.cause == "bad_input"]


def train(model: nn.Module, monitor: GradMonitor, batches, classify: bool = False, opt=None):
    optimizer = opt or torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in batches:
        out = model(x)
        loss = nn.functional.cross_entropy(out, y) if classify else nn.functional.mse_loss(out, y)
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()


@pytest.mark.parametrize("device", DEVICES)
def test_feature_statistics_match_numpy_and_add_up_within_a_step(device):
    model = small_mlp(device)
    monitor = GradMonitor(model)
    a = torch.randn(16, 4, device=device) * torch.tensor([1.0, 10.0, 100.0, 0.1], device=device)
    b = torch.randn(8, 4, device=device)
    b[2, 1] = NAN
    b[5, 3] = math.inf
    model(a)
    model(b)  # two forwards in step 0 (gradient accumulation)
    (f,) = monitor.history().features
    values = torch.cat([a, b]).double().cpu().numpy()
    finite = np.isfinite(values)
    kept = np.where(finite, values, 0.0)
    count = finite.sum(0)
    assert (f.site, f.dim, f.ndim) == ("input[0]", 1, 2)
    np.testing.assert_array_equal(f.count[0], count)
    np.testing.assert_allclose(f.mean[0], kept.sum(0) / count, rtol=FEATURE_RTOL)
    np.testing.assert_allclose(f.rms[0], np.sqrt((kept**2).sum(0) / count), rtol=FEATURE_RTOL)
    np.testing.assert_array_equal(f.low[0], np.where(finite, values, np.inf).min(0))
    np.testing.assert_array_equal(f.high[0], np.where(finite, values, -np.inf).max(0))
    np.testing.assert_array_equal(f.nan[0], [0, 1, 0, 0])
    np.testing.assert_array_equal(f.inf[0], [0, 0, 0, 1])
    assert f.first_nan.tolist() == [-1, 0, -1, -1]
    h = monitor.history()
    # The input's own statistics come from the same pass.
    assert h.site_max_abs[0, 0] == np.abs(np.where(finite, values, 0)).max()
    assert (h.site_nan[0, 0], h.site_inf[0, 0]) == (1, 1)


def test_feature_dimension_auto_int_and_off():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    conv(torch.randn(2, 3, 6, 6))
    monitor = GradMonitor(conv)
    conv(torch.randn(2, 3, 6, 6))
    (f,) = monitor.history().features
    assert (f.dim, f.num_features) == (1, 3)  # the channels of NCHW
    seq = nn.Linear(5, 2)
    auto, first, off = (
        GradMonitor(seq),
        GradMonitor(seq, feature_dim=0),
        GradMonitor(seq, feature_dim=None),
    )
    seq(torch.randn(4, 7, 5))
    assert auto.history().features[0].num_features == 5  # [batch, time, features]
    assert first.history().features[0].num_features == 4
    assert off.history().features == ()
    assert off.history().site_max_abs[0, 0] > 0  # the input is still watched as a whole
    with pytest.raises(ValueError, match="feature_dim must be 'auto', None or an integer"):
        GradMonitor(seq, feature_dim="last")


def test_feature_statistics_add_no_host_read():
    model = small_mlp()
    monitor = GradMonitor(model, window=8, watch_modules="all")
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with host_reads_forbidden():
        for _ in range(3 * monitor.window):  # past ring wraps and flight-recorder checks
            loss = nn.functional.mse_loss(model(x), y)
            model.zero_grad()
            loss.backward()
            monitor.step()
    assert monitor.history().features[0].count[-2].tolist() == [8, 8, 8, 8]


# ------------------------------------------------------------------------- the three kinds


def tabular(steps: int, scales, seed: int = 0, batch: int = 32):
    """A regression on features of the given scales (the forgotten scaler when they differ)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor(scales, dtype=torch.float32)
    weights = torch.randn(len(scales), 1, generator=gen)
    for _ in range(steps):
        z = torch.randn(batch, len(scales), generator=gen)
        yield z * scales, z @ weights


def test_unscaled_features_are_named_with_their_scales():
    scales = [1e-3, 0.5, 1.0, 40.0, 3000.0]
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    monitor = GradMonitor(model)
    train(model, monitor, tabular(30, scales))
    (finding,) = bad_inputs(monitor)
    ev = finding.evidence
    assert (finding.step, ev["kind"]) == (0, "unscaled_features")
    assert ev["features"] == (4,)
    assert ev["largest_rms"] == pytest.approx(3000.0, rel=0.2)
    assert ev["smallest_rms"] == pytest.approx(1e-3, rel=0.2)
    assert "unscaled features" in finding.message and "feature 4" in finding.message
    assert "StandardScaler" in finding.advice and "RobustScaler" in finding.advice
    assert "features 4 (mean" in finding.advice


# The advice's numbers: "3 (mean 1407, std 1123)", or "(mean 5000, constant)", or "(mean 5)".
ADVISED = re.compile(r"(\d+) \(mean ([^,)]+)(?:, std ([^,)]+)|, (constant))?\)")
# The advice writes 3 significant digits.
ADVICE_RTOL = 5e-3


def advised(finding) -> dict[int, tuple[float, str | None]]:
    """{feature: (mean, std as written or "constant" or None)} from an unscaled-features advice."""
    return {
        int(j): (float(mean), std or constant or None)
        for j, mean, std, constant in ADVISED.findall(finding.advice)
    }


@pytest.mark.parametrize("batch", [1, 2])
def test_unscaled_advice_gives_each_features_own_spread(batch):
    """The std to standardize with is the spread of all the values seen (what StandardScaler
    fitted on them finds), not the median within-batch std (0 with batch size 1, about half the
    true one with batch size 2)."""
    means, stds = torch.tensor([0.0, 10.0, 2000.0]), torch.tensor([1.0, 50.0, 3000.0])
    gen = torch.Generator().manual_seed(0)
    seen = [means + stds * torch.randn(batch, 3, generator=gen) for _ in range(200)]
    model = nn.Linear(3, 1)
    monitor = GradMonitor(model)
    for x in seen:
        model(x).sum().backward()
        monitor.step()
    (finding,) = bad_inputs(monitor)
    values = torch.cat(seen).double().numpy()
    got = advised(finding)
    assert sorted(got) == [0, 1, 2]
    for j, (mean, std) in got.items():
        assert mean == pytest.approx(values[:, j].mean(), rel=ADVICE_RTOL, abs=ADVICE_RTOL)
        assert float(std) == pytest.approx(values[:, j].std(), rel=ADVICE_RTOL)


def test_unscaled_advice_gives_no_spread_it_does_not_know():
    """One value per feature: no spread is known, so none is written (never "std 0"); a constant
    feature is said to be constant (dividing by its std 0 is no advice)."""
    model = nn.Linear(3, 1)
    one = GradMonitor(model)
    model(torch.tensor([[1e-3, 1.0, 5000.0]]))
    one.close()
    (finding,) = bad_inputs(one)
    assert advised(finding) == {2: (5000.0, None), 1: (1.0, None), 0: (1e-3, None)}
    constant = GradMonitor(model)
    for x, _ in tabular(10, [1e-3, 1.0, 0.0]):
        model(x + torch.tensor([0.0, 0.0, 5000.0])).sum().backward()
        constant.step()
    (finding,) = bad_inputs(constant)
    assert advised(finding)[2] == (5000.0, "constant")


def test_scales_spread_over_orders_of_magnitude_are_unscaled():
    """No feature above the RMS limit, but 1e-4 next to 10: a 1e5-fold spread."""
    model = nn.Linear(3, 1)
    monitor = GradMonitor(model)
    for x, _ in tabular(10, [1e-4, 1.0, 10.0]):
        model(x)
    (finding,) = bad_inputs(monitor)
    assert finding.evidence["kind"] == "unscaled_features"
    assert finding.evidence["spread"] == pytest.approx(1e5, rel=0.3)


def test_an_outlier_row_is_named_with_step_feature_and_value():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    monitor = GradMonitor(model)
    batches = list(tabular(40, [1.0, 1.0, 1.0, 1.0]))
    batches[20][0][7, 3] = 2.5e4  # one corrupted row
    train(model, monitor, batches)
    (finding,) = bad_inputs(monitor)
    ev = finding.evidence
    assert (finding.step, ev["kind"], ev["feature"], ev["value"]) == (20, "outliers", 3, 2.5e4)
    assert ev["ratio"] > monitor.thresholds.outlier_factor
    assert "feature 3 of input[0] held 2.5e4 at step 20" in finding.message
    assert "RobustScaler" in finding.advice


def test_missing_values_name_features_first_steps_and_rows():
    model = nn.Linear(4, 1)
    monitor = GradMonitor(model)
    batches = list(tabular(12, [1.0] * 4))
    batches[5][0][[1, 9], 2] = NAN
    batches[8][0][3, 0] = NAN
    for x, _ in batches:
        model(x).sum().backward()
        monitor.step()
    missing = [f for f in bad_inputs(monitor) if f.evidence["kind"] == "missing_values"]
    (finding,) = missing
    assert (finding.step, finding.evidence["features"], finding.evidence["nan"]) == (5, (2, 0), 2)
    assert "(2 NaN value(s) at that step, in 2 row(s))" in finding.message
    assert "0 (first at step 8)" in finding.message
    assert finding.evidence["steps_affected"] == 2


def test_missing_values_count_values_not_rows_and_bound_the_rows():
    """A row with NaN in 3 features is 3 NaN values in 1 row, not "3 rows"; per-feature counts
    bound the rows (1 to 3) but do not say which: the message gives the bounds."""
    model = nn.Linear(4, 1)
    monitor = GradMonitor(model)
    x = torch.randn(8, 4)
    x[6, :3] = NAN
    model(x)
    (finding,) = [f for f in bad_inputs(monitor) if f.evidence["kind"] == "missing_values"]
    assert finding.evidence["nan"] == 3
    assert "(3 NaN value(s) at that step, in 1 to 3 row(s))" in finding.message


# -------------------------------------------------------------------------- no false alarms


def test_a_converging_fit_is_not_vanishing():
    """Gradients that shrink by orders of magnitude while the loss converges are healthy."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    monitor = GradMonitor(model)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    for _ in range(400):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()
        schedule.step()
    total = monitor.history().total_norm
    assert total[:10].mean() / total[-10:].mean() > 1e4, "the fit should converge for this test"
    assert monitor.diagnose() == []


def sklearn_sets():
    datasets = pytest.importorskip("sklearn.datasets")
    return {
        "digits": (datasets.load_digits(return_X_y=True), True),
        "iris": (datasets.load_iris(return_X_y=True), True),
        "wine": (datasets.load_wine(return_X_y=True), True),
        "diabetes": (datasets.load_diabetes(return_X_y=True), False),
        "linnerud": (datasets.load_linnerud(return_X_y=True), False),
    }


def real_batches(x: np.ndarray, y: np.ndarray, classify: bool, epochs: int, batch: int):
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long if classify else torch.float32)
    if not classify:
        y = y.reshape(len(y), -1)
        y = (y - y.mean(0)) / y.std(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            yield x[order[i : i + batch]], y[order[i : i + batch]]


def mlp(inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, outputs),
    )  # fmt: skip


@pytest.mark.parametrize("name", ["digits", "iris", "wine", "diabetes", "linnerud"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd-momentum"])
def test_healthy_training_on_real_data_has_no_finding(name, optimizer):
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    (x, y), classify = sklearn_sets()[name]
    x = preprocessing.StandardScaler().fit_transform(x)
    outputs = int(y.max()) + 1 if classify else (y.shape[1] if y.ndim > 1 else 1)
    model = mlp(x.shape[1], outputs)
    params = model.parameters()
    opt = (
        torch.optim.Adam(params, lr=1e-3)
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=0.05, momentum=0.9)
    )
    batch, steps = (16, 240) if len(x) < 500 else (32, 240)
    epochs = math.ceil(steps * batch / len(x))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(x) / batch))
    monitor = GradMonitor(model, watch_modules="all")
    for xb, yb in real_batches(x, y, classify, epochs, batch):
        out = model(xb)
        loss = nn.functional.cross_entropy(out, yb) if classify else nn.functional.mse_loss(out, yb)
        opt.zero_grad()
        loss.backward()
        monitor.step()
        opt.step()
        schedule.step()
    assert monitor.diagnose() == [], monitor.report()


def test_raw_wine_is_unscaled():
    """The negative of the test above: the same data without the scaler is found."""
    (x, y), _ = sklearn_sets()["wine"]
    model = mlp(x.shape[1], 3)
    monitor = GradMonitor(model)
    train(model, monitor, real_batches(x, y, True, 2, 16), classify=True)
    (finding,) = bad_inputs(monitor)
    assert finding.evidence["kind"] == "unscaled_features"
    assert finding.evidence["features"][0] == 12  # proline, in the hundreds to thousands
    expected = x[:, 12].mean()
    mean = float(finding.advice.split("12 (mean ")[1].split(",")[0])
    assert mean == pytest.approx(expected, rel=0.2)


def test_thresholds_of_the_feature_rules():
    with pytest.raises(ValueError, match="outlier_factor must be > 1"):
        MonitorThresholds(outlier_factor=1.0)
    lenient = MonitorThresholds(unscaled_rms_limit=1e4, scale_spread_limit=1e7)
    model = nn.Linear(5, 1)
    monitor = GradMonitor(model, thresholds=lenient)
    for x, _ in tabular(10, [1e-3, 0.5, 1.0, 40.0, 3000.0]):
        model(x)
    assert bad_inputs(monitor) == []


def test_unscaled_features_example():
    example = load_example("nan_unscaled_features")
    (finding,) = example.train("unscaled").diagnose()
    assert (finding.cause, finding.evidence["kind"]) == ("bad_input", "unscaled_features")
    assert finding.evidence["features"] == (example.OUTLIER_FEATURE,)  # the population
    findings = example.train("outlier").diagnose()
    assert findings[0].evidence["kind"] == "outliers"  # the cause before its consequence
    assert (findings[0].step, findings[0].evidence["value"]) == (30, example.OUTLIER_VALUE)
    assert example.train("scaled").diagnose() == []
