"""A real Lightning fit with AdaptiveGradientClipping, run by the tests as its own process.

    python tests/lightning_fit.py --strategy ddp --devices 2 --out DIR

Each rank writes ``DIR/rank{r}.json``: the norm and threshold of every optimizer step, the
final weights and the callback's state. Lightning's ``ddp`` and ``ModelParallelStrategy``
launch the other ranks by re-running this script, as they do for users.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from clipintegrations import build_clipper
from clipintegrations.lightning import AdaptiveGradientClipping


def dataset(size: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, 16, generator=generator)
    y = x[:, :1] * x[:, 1:2] + torch.sin(x[:, 2:3])
    y[::11] *= 40.0  # outliers, so that every method clips
    return TensorDataset(x, y)


class Regression(L.LightningModule):
    def __init__(self, batch_size: int, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        self.batch_size, self.lr = batch_size, lr

    def train_dataloader(self) -> DataLoader:
        # In order, so that a 2-rank run sees, per step, the batch of a 1-rank run with twice the batch size
        # (Lightning's own distributed sampler shuffles training data).
        data = dataset()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return DataLoader(data, self.batch_size, sampler=DistributedSampler(data, world, rank, shuffle=False))

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self.net, mesh=mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(L.Callback):
    """Reads what the clipping callback did on each step, and writes it at the end."""

    def __init__(self, clipping: AdaptiveGradientClipping, out: Path) -> None:
        self.clipping, self.out = clipping, out
        self.norms: list = []
        self.thresholds: list = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(self.clipping.last_stats.norm.tolist())
        self.thresholds.append(self.clipping.last_stats.threshold.tolist())

    def on_fit_end(self, trainer, pl_module):
        weights = [
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist() for p in pl_module.parameters()
        ]
        state = self.clipping.state_dict()
        record = {
            "norms": self.norms,
            "thresholds": self.thresholds,
            "weights": weights,
            "clipper_state": json.loads(json.dumps(state, default=lambda t: t.tolist())),
            "global_step": trainer.global_step,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp", "fsdp2"])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clipper", default='{"method": "autoclip", "percentile": 10}')
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clipping = AdaptiveGradientClipping(build_clipper(json.loads(args.clipper)))
    strategy = args.strategy
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
        accumulate_grad_batches=args.accumulate,
        max_epochs=args.epochs,
        callbacks=[clipping, Recorder(clipping, out), checkpoints],
        logger=L.pytorch.loggers.CSVLogger(out, name="logs", version=0),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=False,
    )
    trainer.fit(Regression(args.batch_size), ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main()
