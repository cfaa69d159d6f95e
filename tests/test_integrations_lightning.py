"""gradstats.integrations.lightning against the real Lightning Trainer: a tiny MLP, random data,
the CPU. Stock Lightning runs (gradient_clip_val, torch's clipping) are the reference and the
negative controls."""

from __future__ import annotations

import copy
import csv
import logging
import math
import warnings

import pytest
import torch
from helpers import equal_bitwise

pl = pytest.importorskip(
    "lightning.pytorch", reason="needs lightning (pip install 'gradstats[lightning]')"
)

from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import gradstats  # noqa: E402
from gradstats.integrations.lightning import GradStatsCallback  # noqa: E402
from gradstats.optim import STATE_KEY  # noqa: E402

STEPS = 24
BATCHES = 12  # batches per epoch: checkpoints after the first epoch are half-way
MAX_NORM = 0.5  # below the model's gradient norms: every step clips
NAN_STEP = 6  # the optimizer step (1-based) whose gradients get a NaN


@pytest.fixture(autouse=True)
def _quiet():
    """Lightning's advice about workers, loggers and devices is noise here."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        yield


class Net(pl.LightningModule):
    def __init__(self, optimizer="sgd", wrap=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
        )
        self.optimizer, self.wrap = optimizer, wrap
        self.nan_steps: set[int] = set()
        self.net[0].weight.register_hook(self._maybe_nan)

    def _maybe_nan(self, grad):
        return grad * math.nan if self.trainer.global_step + 1 in self.nan_steps else grad

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            # Plain SGD: the update is proportional to the clipped gradient, so a wrong clip
            # coefficient shows in the losses (Adam's update hardly changes with a uniform scale).
            opt = torch.optim.SGD(self.parameters(), lr=0.2)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        if self.wrap:
            opt = gradstats.ClipGradOptimizer(opt, max_norm=MAX_NORM)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 8, 16, generator=gen) * 3
    y = torch.randn(BATCHES * 8, 1, generator=gen) * 3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Probe(pl.Callback):
    """Per step: the loss, torch's gradient norm before clipping, what GradStatsCallback logged,
    and the weights and optimizer state around the given step."""

    def __init__(self, watch_step=None):
        self.watch_step = watch_step
        self.losses, self.torch_norms, self.logged, self.lrs = [], [], [], []
        self.before = self.after = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.watch_step:
            self.before = _snapshot(pl_module, trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.torch_norms.append(torch.nn.utils.get_total_norm(grads).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        if trainer.global_step == self.watch_step:
            self.after = _snapshot(pl_module, trainer)


def _snapshot(pl_module, trainer):
    """Weights and optimizer state (the wrapper's own counters left out: they count the skip)."""
    optimizer_state = trainer.optimizers[0].state_dict()
    optimizer_state.pop(STATE_KEY, None)
    return (
        {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
        copy.deepcopy(optimizer_state),
    )


def fit(tmp_path, callbacks=(), module=None, ckpt_path=None, **trainer_args):
    module = module or Net()
    settings = dict(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
    )
    settings.update(trainer_args)
    trainer = pl.Trainer(callbacks=list(callbacks), **settings)
    trainer.fit(module, make_data(), ckpt_path=ckpt_path)
    return trainer, module


# --------------------------------------------------------------------------- stock vs gradstats


def test_losses_and_norms_match_stock_lightning(tmp_path):
    stock = Probe()
    fit(tmp_path / "stock", [stock], gradient_clip_val=MAX_NORM)
    ours = Probe()
    fit(tmp_path / "ours", [GradStatsCallback(max_norm=MAX_NORM), ours])
    assert len(stock.losses) == len(ours.losses) == STEPS
    assert all(n > MAX_NORM for n in stock.torch_norms), "clipping must be active"
    assert ours.losses == pytest.approx(stock.losses, rel=1e-5, abs=0)
    assert [h["grad_norm"] for h in ours.logged] == pytest.approx(stock.torch_norms, rel=1e-5)
    counts = {(h["grad_nan_count"], h["grad_inf_count"], h["skipped_steps"]) for h in ours.logged}
    assert counts == {(0.0, 0.0, 0.0)}
    assert ours.lrs == stock.lrs


def test_gradient_accumulation_matches_stock_lightning(tmp_path):
    stock, ours = Probe(), Probe()
    fit(tmp_path / "stock", [stock], gradient_clip_val=MAX_NORM, accumulate_grad_batches=2)
    callback = GradStatsCallback(max_norm=MAX_NORM)
    fit(tmp_path / "ours", [callback, ours], accumulate_grad_batches=2)
    assert len(ours.torch_norms) == STEPS  # optimizer steps, each over two batches
    assert ours.losses == pytest.approx(stock.losses, rel=1e-5, abs=0)
    assert ours.torch_norms == pytest.approx(stock.torch_norms, rel=1e-5, abs=0)


def test_without_max_norm_nothing_is_clipped(tmp_path):
    stock, ours = Probe(), Probe()
    fit(tmp_path / "stock", [stock])
    fit(tmp_path / "ours", [GradStatsCallback(), ours])
    assert ours.losses == pytest.approx(stock.losses, rel=1e-5, abs=0)
    assert [h["grad_norm"] for h in ours.logged] == pytest.approx(stock.torch_norms, rel=1e-5)


def test_the_comparison_can_fail(tmp_path):
    """Negative control: a slightly different clip threshold moves the losses beyond tolerance."""
    stock, other = Probe(), Probe()
    fit(tmp_path / "stock", [stock], gradient_clip_val=MAX_NORM)
    fit(tmp_path / "other", [GradStatsCallback(max_norm=1.001 * MAX_NORM), other])
    assert other.losses != pytest.approx(stock.losses, rel=1e-5, abs=0)


def test_logs_reach_lightnings_logger(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path)
    fit(tmp_path, [GradStatsCallback(max_norm=MAX_NORM)], logger=logger, log_every_n_steps=5)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad_norm")]
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19]  # Lightning's 0-based logging steps
    assert all(r["grad_nan_count"] == "0.0" and r["skipped_steps"] == "0.0" for r in rows)


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers, of which only the second ever steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
        )
        self.automatic_optimization = False
        self.torch_norms, self.logged = [], []

    def training_step(self, batch, batch_idx):
        _, second = self.optimizers()
        x, y = batch
        second.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self.net(x), y))
        grads = [p.grad for p in self.net[2].parameters()]
        self.torch_norms.append(torch.nn.utils.get_total_norm(grads).item())
        second.step()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.logged.append({k: float(v) for k, v in self.trainer.callback_metrics.items()})

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1),
        ]


def test_each_optimizer_s_norm_is_logged_under_its_own_index(tmp_path):
    module = TwoOptimizers()
    fit(tmp_path, [GradStatsCallback()], module=module, max_steps=4)
    assert len(module.logged) == 4
    assert all("grad_norm/0" not in h for h in module.logged), "optimizer 0 never stepped"
    got = [h["grad_norm/1"] for h in module.logged]
    assert got == pytest.approx(module.torch_norms, rel=1e-5)


def count_calls(monkeypatch, module, name, calls, label=None):
    """Records label (default: name) in calls at each call of module.name. The fused pass is
    ops.stats, or ops.plan_stats when a GradPlan serves the gradients."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(label or name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_one_pass_per_step(tmp_path, monkeypatch):
    """One fused statistics launch per step (the monitor reuses it), no torch clipping."""
    calls = []
    count_calls(monkeypatch, gradstats.ops, "stats", calls)
    count_calls(monkeypatch, gradstats.ops, "plan_stats", calls, "stats")
    count_calls(monkeypatch, torch.nn.utils, "clip_grad_norm_", calls)
    trainer, _ = fit(tmp_path, [GradStatsCallback(max_norm=MAX_NORM, monitor=True)])
    assert calls == ["stats"] * STEPS
    assert all(isinstance(o, gradstats.ClipGradOptimizer) for o in trainer.optimizers)


def test_the_pass_count_would_see_torch_clipping(tmp_path, monkeypatch):
    """Negative control: Lightning's own clipping calls torch's function every step."""
    calls = []
    count_calls(monkeypatch, torch.nn.utils, "clip_grad_norm_", calls)
    fit(tmp_path, gradient_clip_val=MAX_NORM)
    assert calls == ["clip_grad_norm_"] * STEPS


# ---------------------------------------------------------------------------- non-finite steps


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_nan_step_is_skipped_without_a_scheduler_step(tmp_path, optimizer):
    module = Net(optimizer)
    module.nan_steps = {NAN_STEP}
    probe = Probe(watch_step=NAN_STEP)
    callback = GradStatsCallback(max_norm=MAX_NORM)
    trainer, _ = fit(tmp_path, [callback, probe], module=module)
    assert equal_bitwise(probe.before, probe.after), "weights or optimizer state changed"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == STEPS - 1
    lr = probe.lrs
    assert lr[NAN_STEP - 1] == lr[NAN_STEP - 2], "the LR must not move past a skipped step"
    assert all(lr[i + 1] < lr[i] for i in range(STEPS - 1) if i != NAN_STEP - 2)
    numel = module.net[0].weight.numel()
    logged = probe.logged[NAN_STEP - 2 : NAN_STEP + 1]
    assert [h["grad_nan_count"] for h in logged] == [0, numel, numel]
    assert [h["skipped_steps"] for h in logged] == [0, 1, 1]
    assert math.isnan(logged[1]["grad_norm"])
    assert callback.skipped_steps == 1


@pytest.mark.parametrize("on_nonfinite", ["skip", "propagate"])
def test_grad_scaler_overflows_hold_the_scheduler_too(tmp_path, on_nonfinite):
    """Under a GradScaler (16-mixed; here its CPU version) the wrapper skips the scaler's overflow
    steps whatever on_nonfinite says, and the scheduler stays still on each; stock Lightning steps
    it regardless (negative control)."""

    def scaled():
        return [MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))]

    module = Net("adamw")
    module.nan_steps = {NAN_STEP}
    callback = GradStatsCallback(max_norm=MAX_NORM, on_nonfinite=on_nonfinite)
    trainer, _ = fit(tmp_path / "ours", [callback], module=module, plugins=scaled())
    skipped = callback.skipped_steps
    assert skipped >= 1  # the NaN step, and the scaler's first overflows as it finds its scale
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS - skipped
    assert all(torch.isfinite(p).all() for p in module.parameters())
    stock, _ = fit(tmp_path / "stock", module=Net("adamw"), plugins=scaled())
    assert stock.lr_scheduler_configs[0].scheduler.last_epoch == STEPS


def test_stock_lightning_spreads_the_nan_and_steps_the_scheduler(tmp_path):
    """Negative control: without the callback the same NaN reaches the weights and the scheduler
    advances on every step."""
    module = Net()
    module.nan_steps = {NAN_STEP}
    trainer, _ = fit(tmp_path, module=module, gradient_clip_val=MAX_NORM)
    assert not all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS


def test_the_scheduler_hook_is_put_back(tmp_path):
    module = Net()
    fit(tmp_path, [GradStatsCallback(max_norm=MAX_NORM)], module=module)
    assert "lr_scheduler_step" not in vars(module)

    class Boom(pl.Callback):
        def on_train_batch_end(self, *args):
            raise KeyError("boom")

    failing = Net()
    with pytest.raises(KeyError):
        fit(tmp_path, [GradStatsCallback(max_norm=MAX_NORM), Boom()], module=failing)
    assert "lr_scheduler_step" not in vars(failing)


def test_misconfiguration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_clip_val"):
        fit(tmp_path, [GradStatsCallback(max_norm=MAX_NORM)], gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="plain optimizer"):
        fit(tmp_path, [GradStatsCallback(max_norm=MAX_NORM)], module=Net(wrap=True))
    with pytest.raises(ValueError, match="max_norm"):
        GradStatsCallback(max_norm=-1.0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradStatsCallback(on_nonfinite="ignore")


class Manual(Net):
    """Manual optimization: training_step steps its optimizer itself, clipping with Lightning's
    own clip_gradients when asked to (the stock reference)."""

    def __init__(self, clip_itself=False):
        super().__init__()
        self.automatic_optimization = False
        self.clip_itself = clip_itself

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.manual_backward(loss)
        if self.clip_itself:
            self.clip_gradients(opt, gradient_clip_val=MAX_NORM, gradient_clip_algorithm="norm")
        opt.step()
        return {"loss": loss.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def test_manual_optimization_clips_and_skips_every_opt_step(tmp_path):
    """Decided: the callback clips manual optimization's opt.step() too (documented)."""
    stock, unclipped, ours = Probe(), Probe(), Probe(watch_step=NAN_STEP)
    fit(tmp_path / "stock", [stock], module=Manual(clip_itself=True))
    fit(tmp_path / "unclipped", [unclipped], module=Manual())
    callback = GradStatsCallback(max_norm=MAX_NORM)
    module = Manual()
    module.nan_steps = {NAN_STEP}
    fit(tmp_path / "ours", [callback, ours], module=module)
    assert len(ours.losses) == len(stock.losses) == STEPS
    before = NAN_STEP - 1  # the losses up to the NaN step, whose update is skipped
    assert ours.losses[:before] == pytest.approx(stock.losses[:before], rel=1e-5, abs=0)
    clipping_shows = unclipped.losses[:before] != pytest.approx(stock.losses[:before], rel=1e-5)
    assert clipping_shows, "clipping must change the losses"
    assert equal_bitwise(ours.before, ours.after), "the NaN step changed the weights"
    assert callback.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ----------------------------------------------------------------------------------- monitor


def test_monitor_reports_the_nan(tmp_path, caplog):
    module = Net()
    module.nan_steps = {NAN_STEP}
    callback, probe = GradStatsCallback(max_norm=MAX_NORM, monitor=True), Probe()
    with caplog.at_level(logging.WARNING, logger="gradstats"):
        fit(tmp_path, [callback, probe], module=module)
    assert callback.report is not None and "net.0.weight" in callback.report
    assert [r for r in caplog.records if "GradMonitor" in r.getMessage()]
    assert probe.logged[NAN_STEP - 2]["gradstats_findings"] == 0
    assert probe.logged[NAN_STEP - 1]["gradstats_findings"] >= 1


def nan_batch_data(nan_batch):
    """make_data() with a NaN feature in every sample of one batch."""
    data = make_data()
    x, y = data.dataset.tensors
    x = x.clone()
    x[nan_batch * data.batch_size : (nan_batch + 1) * data.batch_size, 3] = math.nan
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("monitor", ["ours", "given"])
def test_monitor_watches_the_batches_training_step_reads(tmp_path, monitor):
    """Net.training_step never calls the module's forward: the callback's own monitor watches
    the batches and blames the NaN input; a GradMonitor passed in, hooked on that unused
    forward, watches nothing (the negative control)."""
    module = Net()
    given = gradstats.GradMonitor(module)
    callback = GradStatsCallback(max_norm=MAX_NORM, monitor=True if monitor == "ours" else given)
    settings = dict(max_steps=STEPS, accelerator="cpu", devices=1, logger=False)
    settings.update(enable_checkpointing=False, enable_progress_bar=False)
    trainer = pl.Trainer(callbacks=[callback], default_root_dir=str(tmp_path), **settings)
    trainer.fit(module, nan_batch_data(NAN_STEP - 1))
    causes = {f.cause for f in callback.monitor.diagnose()}
    if monitor == "ours":
        assert "bad_input" in causes
        assert "input[0]" in callback.monitor.report()
    else:
        assert "bad_input" not in causes


def test_monitor_is_quiet_on_healthy_training(tmp_path):
    callback, probe = GradStatsCallback(max_norm=MAX_NORM, monitor=True), Probe()
    fit(tmp_path, [callback, probe])
    assert callback.report is None
    assert {h["gradstats_findings"] for h in probe.logged} == {0.0}


# ------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("with_optimizer", [False, True], ids=["callback", "ClipGradOptimizer"])
def test_resume_from_checkpoint_gives_the_same_run(tmp_path, with_optimizer):
    """Saved at the end of the first epoch (step 12) and resumed: the same losses, logged counts and
    bitwise the same weights as the uninterrupted run, NaN steps skipped on both sides."""

    def run(out, ckpt_path=None):
        module = Net("adamw", wrap=with_optimizer)
        module.nan_steps = {NAN_STEP, BATCHES + NAN_STEP}
        probe = Probe()
        callbacks = [probe] if with_optimizer else [GradStatsCallback(max_norm=MAX_NORM), probe]
        # Saved after the epoch's last batch: Lightning resumes such a checkpoint at the next
        # epoch's first batch (from an epoch-end checkpoint it repeats a batch; mid-epoch ones need
        # a resumable data loader).
        checkpoint = pl.callbacks.ModelCheckpoint(
            dirpath=out, every_n_train_steps=BATCHES, save_top_k=-1
        )
        trainer, _ = fit(
            out,
            [*callbacks, checkpoint],
            module=module,
            ckpt_path=ckpt_path,
            enable_checkpointing=True,
        )
        return trainer, module, probe

    _, whole, whole_probe = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / f"epoch=0-step={BATCHES}.ckpt"
    trainer, resumed, resumed_probe = run(tmp_path / "resumed", ckpt_path=str(checkpoint))
    assert equal_bitwise(whole.state_dict(), resumed.state_dict())
    assert resumed_probe.losses == whole_probe.losses[BATCHES:]
    assert resumed_probe.lrs == whole_probe.lrs[BATCHES:]
    if not with_optimizer:
        keys = ("grad_nan_count", "skipped_steps")
        tail = [[h[k] for k in keys] for h in whole_probe.logged[BATCHES:]]
        assert [[h[k] for k in keys] for h in resumed_probe.logged] == tail
    assert int(trainer.optimizers[0].skipped_steps) == 2
    # Returned from configure_optimizers, the wrapper skips but Lightning still steps the scheduler.
    scheduler_steps = STEPS if with_optimizer else STEPS - 2
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == scheduler_steps
