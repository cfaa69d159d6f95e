"""The dist scenario's report (gradstats.bench.dist): the clip's share of the post-backward path
from its rows, and the table; the scenario itself launches ranks (about a minute on 2 CPU cores),
so it is run by hand (README), not here."""

from __future__ import annotations

import pytest

from gradstats.bench import dist
from gradstats.bench.cases import SCENARIOS
from gradstats.bench.cli import _choose


def rows(alone: float, with_pass: float, from_reduction: float) -> list[dist.DistRow]:
    make = lambda side, us: dist.DistRow("ddp", "many-small", 2000, 128000, side, us, 1000.0)  # noqa: E731
    return [
        make("torch clip_grad_norm_", 1000.0),
        make(dist.STEP_ALONE, alone),
        make(dist.STEP_WITH_PASS, with_pass),
        make(dist.STEP_FROM_REDUCTION, from_reduction),
    ]


def test_clip_share_is_what_the_clip_adds_to_the_step():
    shares = dist.clip_shares(rows(alone=500.0, with_pass=800.0, from_reduction=530.0))
    assert shares == {("ddp", "many-small"): (300.0, 30.0)}
    text = dist.markdown(rows(500.0, 800.0, 530.0), "test machine", 2)
    assert "(10% of the pass's)" in text and "| ddp | many-small | 2,000 | 128,000 |" in text


def test_noise_below_the_step_alone_is_floored_not_negative():
    shares = dist.clip_shares(rows(alone=500.0, with_pass=490.0, from_reduction=480.0))
    assert shares[("ddp", "many-small")] == (1.0, 1.0)


def test_dist_is_not_part_of_all():
    assert dist.DIST_SCENARIO not in _choose(["all"], SCENARIOS, SCENARIOS, "scenario")
    with pytest.raises(SystemExit, match="unknown scenario"):
        _choose([dist.DIST_SCENARIO], SCENARIOS, SCENARIOS, "scenario")
