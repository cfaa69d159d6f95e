"""Training-step time of the Hugging Face and Lightning Trainers, stock and with GradStatsCallback.

    python benchmarks/integrations_step_time.py [--repeats 7] [--steps 50] [--threads 1]

Each repeat trains a fresh small model both ways, in alternating order, in this one process (the
ratio is what carries over between machines; a shared machine moves the absolute times). A step is
timed from the framework's step-begin to its step-end callback: forward, backward, clipping,
optimizer and scheduler step. The first WARMUP steps of each run are left out; each run gives the
median of the rest, and the table the median over repeats. One intra-op thread by default: on a
machine shared with other jobs, threads that wait for each other make the times swing far more than
the difference measured.

Hugging Face: GPT-2 from a config (4 layers, width 128, 1.1M parameters; 8 x 64 tokens), default
AdamW (fused on torch >= 2.8), max_grad_norm=1.0; stock clips with torch, the callback with
gradstats. Lightning: an MLP (1.1M parameters, batch 64), AdamW; stock clips with
gradient_clip_val=1.0, the callback with max_norm=1.0.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import transformers

from gradstats.integrations.lightning import GradStatsCallback as LightningCallback
from gradstats.integrations.transformers import GradStatsCallback as HFCallback

WARMUP = 10  # steps left out of each run: allocator and first-call costs
MAX_NORM = 1.0


class HFTimer(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, *args, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self.start)


class LightningTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args):
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self.start)


def hf_run(with_gradstats: bool, steps: int, device: str, out: str) -> float:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, config.vocab_size, (steps * 8, 64))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        max_grad_norm=MAX_NORM,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )
    timer = HFTimer()
    callbacks = [HFCallback(), timer] if with_gradstats else [timer]
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return statistics.median(timer.times[WARMUP:])


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        width = 512
        self.net = torch.nn.Sequential(
            torch.nn.Linear(256, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, 10),
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def lightning_run(with_gradstats: bool, steps: int, device: str, out: str) -> float:
    x, y = torch.randn(steps * 64, 256), torch.randint(0, 10, (steps * 64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    timer = LightningTimer()
    callbacks = [LightningCallback(max_norm=MAX_NORM), timer] if with_gradstats else [timer]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        gradient_clip_val=None if with_gradstats else MAX_NORM,
        callbacks=callbacks,
    )
    trainer.fit(MLP(), loader)
    return statistics.median(timer.times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="/tmp/gradstats-integrations-bench")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, ", end="")
    print(f"lightning {pl.__version__}, {torch.get_num_threads()} threads, {args.device}")
    header = f"{'framework':<12} {'stock ms':>9} {'gradstats ms':>13} {'ratio':>7}"
    print(f"{header}  (ratio of each repeat)")
    for name, run in (("HF Trainer", hf_run), ("Lightning", lightning_run)):
        stock, ours, ratios = [], [], []
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            times = {flag: run(flag, args.steps, args.device, args.out) for flag in order}
            stock.append(times[False])
            ours.append(times[True])
            ratios.append(times[True] / times[False])
        stock_ms, ours_ms = statistics.median(stock) * 1e3, statistics.median(ours) * 1e3
        print(
            f"{name:<12} {stock_ms:9.2f} {ours_ms:13.2f} {statistics.median(ratios):7.3f}"
            f"  ({', '.join(f'{r:.2f}' for r in ratios)})"
        )


if __name__ == "__main__":
    main()
