"""AdaptiveGradientClipping in a real Lightning Trainer: strategies, accumulation, logs, checkpoints, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning_fit import Recorder, Regression

from clipintegrations import AutoClip, build_clipper
from clipintegrations.lightning import AdaptiveGradientClipping

SCRIPT = Path(__file__).with_name("lightning_fit.py")


def launch(out: Path, *args: str) -> list[dict]:
    """Run tests/lightning_fit.py as users run a script: Lightning launches the other ranks itself."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def trainer(tmp_path: Path, clipping: AdaptiveGradientClipping, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(callbacks=[clipping, *kwargs.pop("callbacks", [])], **{**defaults, **kwargs})


@pytest.mark.distributed
@pytest.mark.parametrize("granularity", ["global", "layer"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_rank_has_the_single_process_thresholds(tmp_path, strategy, granularity):
    clipper = json.dumps({"method": "autoclip", "percentile": 25, "granularity": granularity})
    (reference,) = launch(tmp_path / "single", "--batch-size", "8", "--clipper", clipper)
    rank0, rank1 = launch(tmp_path / strategy, "--strategy", strategy, "--devices", "2", "--clipper", clipper)
    assert rank0["thresholds"] == rank1["thresholds"]  # identical, to the bit
    assert rank0["norms"] == rank1["norms"]
    assert len(rank0["thresholds"]) == reference["global_step"] == 16
    torch.testing.assert_close(
        torch.tensor(rank0["thresholds"]), torch.tensor(reference["thresholds"]), rtol=1e-5, atol=0
    )
    for got, expected in zip(rank0["weights"], reference["weights"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert any(
        n > t for n, t in zip(torch.tensor(rank0["norms"]).flatten(), torch.tensor(rank0["thresholds"]).flatten())
    )


@pytest.mark.distributed
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="Lightning's FSDPStrategy (FSDP1) needs 2 CUDA GPUs; none here"
)
def test_fsdp1_flat_shards_sum_over_the_fsdp_group(tmp_path):
    (reference,) = launch(tmp_path / "single", "--batch-size", "8", "--accelerator", "gpu")
    ranks = launch(tmp_path / "fsdp", "--strategy", "fsdp", "--devices", "2", "--accelerator", "gpu")
    for rank in ranks:
        torch.testing.assert_close(
            torch.tensor(rank["thresholds"]), torch.tensor(reference["thresholds"]), rtol=1e-5, atol=0
        )


def test_clips_once_per_optimizer_step_after_accumulation(tmp_path):
    def run(batch_size, accumulate):
        clipping = AdaptiveGradientClipping(AutoClip(percentile=25))
        recorder = Recorder(clipping, tmp_path)
        trainer(tmp_path, clipping, callbacks=[recorder], accumulate_grad_batches=accumulate).fit(
            Regression(batch_size)
        )
        return recorder.thresholds

    accumulated, whole = run(4, 2), run(8, 1)
    assert len(accumulated) == len(whole) == 8  # 64 samples, 8 optimizer steps
    torch.testing.assert_close(torch.tensor(accumulated), torch.tensor(whole), rtol=1e-5, atol=0)


def test_bf16_mixed_precision_clips_fp32_norms(tmp_path):
    clipping = AdaptiveGradientClipping(AutoClip(percentile=10))
    recorder = Recorder(clipping, tmp_path)
    trainer(tmp_path, clipping, callbacks=[recorder], precision="bf16-mixed").fit(Regression(8))
    assert len(recorder.norms) == 8 and all(torch.isfinite(torch.tensor(recorder.thresholds)))
    assert clipping.last_stats.norm.dtype == torch.float32


def test_metrics_reach_csv_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    clipping = AdaptiveGradientClipping(AutoClip(percentile=10))
    recorder = Recorder(clipping, tmp_path)
    loggers = [
        L.pytorch.loggers.CSVLogger(tmp_path, name="csv"),
        L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb"),
    ]
    trainer(tmp_path, clipping, callbacks=[recorder], logger=loggers, log_every_n_steps=1).fit(Regression(8))
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    norms = [float(r.split(",")[header.index("clip/norm")]) for r in rows[1:]]
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(recorder.norms), rtol=1e-6, atol=0)
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"clip/norm", "clip/threshold", "clip/clip_rate"} <= set(events.Tags()["scalars"])
    thresholds = [e.value for e in events.Scalars("clip/threshold")]
    torch.testing.assert_close(torch.tensor(thresholds), torch.tensor(recorder.thresholds), rtol=1e-6, atol=0)
    rates = [e.value for e in events.Scalars("clip/clip_rate")]
    clipped = [n > t for n, t in zip(recorder.norms, recorder.thresholds)]
    assert rates[-1] == pytest.approx(sum(clipped) / len(clipped))


def test_checkpoint_holds_the_clipper_state_loadable_with_weights_only(tmp_path):
    clipping = AdaptiveGradientClipping(AutoClip(percentile=10, granularity="layer"))
    fit = trainer(tmp_path, clipping, enable_checkpointing=True, max_epochs=1)
    fit.fit(Regression(8))
    (path,) = (tmp_path).rglob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"][clipping.state_key]
    assert state["clippers"][0]["units"] == ["net.0", "net.2", "net.4"]
    assert state["clippers"][0]["state"]["counts"].tolist() == [8, 8, 8]


def resume_run(tmp_path: Path, *args: str) -> tuple[dict, list[dict]]:
    """An uninterrupted 3-epoch run, and one stopped after epoch 1 and resumed from its checkpoint."""
    (whole,) = launch(tmp_path / "whole", "--epochs", "3", *args)[:1]
    launch(tmp_path / "first", "--epochs", "1", *args)
    (checkpoint,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    resumed = launch(tmp_path / "resumed", "--epochs", "3", "--ckpt-path", str(checkpoint), *args)
    return whole, resumed


@pytest.mark.parametrize("devices", [1, 2])
def test_resume_from_an_epoch_checkpoint_is_bitwise_identical(tmp_path, devices):
    args = ["--clipper", json.dumps({"method": "zclip", "warmup_steps": 3})]
    if devices == 2:
        args += ["--strategy", "ddp", "--devices", "2"]
    whole, resumed = resume_run(tmp_path, *args)
    for rank in resumed:
        assert rank["thresholds"] == whole["thresholds"][-len(rank["thresholds"]) :]  # the last 2 epochs
        assert rank["weights"] == whole["weights"]
        assert rank["clipper_state"] == whole["clipper_state"]


def test_event_order_clip_after_backward_and_accumulation_before_builtin_clip_and_step(tmp_path):
    events: list[str] = []

    class Watched(Regression):
        def on_after_backward(self):
            events.append("backward")

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            events.append("builtin clip")

        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            events.append("optimizer.step")

    class Clipping(AdaptiveGradientClipping):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            events.append("clip")
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    trainer(tmp_path, Clipping(AutoClip()), accumulate_grad_batches=2, max_steps=2).fit(Watched(8))
    step = ["backward", "backward", "clip", "builtin clip", "optimizer.step"]
    assert events == step + step


def test_lightning_cli_configures_the_callback_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: clipintegrations.lightning.AdaptiveGradientClipping
      init_args:
        clipper:
          class_path: clipintegrations.PercentileClip
          init_args:
            percentile: 90
            window: 50
            warmup_steps: 1
            granularity: layer
model:
  batch_size: 8
"""
    )
    cli = LightningCLI(Regression, args=["fit", "--config", str(config)], save_config_callback=None)
    (clipping,) = [c for c in cli.trainer.callbacks if isinstance(c, AdaptiveGradientClipping)]
    assert (
        clipping.clipper.config()
        == build_clipper(
            {"method": "percentile", "percentile": 90, "window": 50, "warmup_steps": 1, "granularity": "layer"}
        ).config()
    )
    assert clipping.clipper.history.counts.tolist() == [2, 2, 2]  # it clipped both steps


def test_refuses_gradient_clip_val(tmp_path):
    with pytest.raises(ValueError, match="gradient_clip_val=1.0.*remove `gradient_clip_val`"):
        trainer(tmp_path, AdaptiveGradientClipping(AutoClip()), gradient_clip_val=1.0).fit(Regression(8))


def test_refuses_deepspeed():
    """DeepSpeed cannot be installed on this CPU machine: the strategy object stands in, unconfigured."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    stand_in = SimpleNamespace(gradient_clip_val=None, strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    with pytest.raises(ValueError, match="DeepSpeed owns the optimizer step"):
        AdaptiveGradientClipping(AutoClip()).setup(stand_in, None, "fit")


def fp16_with_scaler() -> MixedPrecision:
    """Lightning maps precision='16-mixed' to bf16 on CPU; the plugin itself runs fp16 with a real GradScaler."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def test_refuses_a_fused_optimizer_under_fp16_scaling(tmp_path):
    class Fused(Regression):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    with pytest.raises(ValueError, match="fused=True.*use fused=False"):
        trainer(tmp_path, AdaptiveGradientClipping(AutoClip()), plugins=[fp16_with_scaler()]).fit(Fused(8))


def test_fp16_scaler_unscales_before_the_clip_and_overflow_steps_stay_out(tmp_path):
    """The scaler starts at 2**16, so the first steps overflow in fp16, as in real runs."""
    clipping = AdaptiveGradientClipping(AutoClip(percentile=50, nonfinite="keep"))
    recorder = Recorder(clipping, tmp_path)
    trainer(tmp_path, clipping, callbacks=[recorder], plugins=[fp16_with_scaler()], max_epochs=2).fit(Regression(8))
    norms = torch.tensor(recorder.norms)
    finite = torch.isfinite(norms)
    assert 0 < int(finite.sum()) < len(norms), norms  # overflow steps happened, and normal ones
    assert clipping.clipper.history.counts.tolist() == [int(finite.sum())]
    assert norms[finite].max() < 1e3  # unscaled: fp32-sized norms, not 2**16 times larger
    thresholds = torch.tensor(recorder.thresholds)[finite].numpy()
    expected = [np.percentile(norms[finite][: i + 1].numpy(), 50) for i in range(int(finite.sum()))]
    np.testing.assert_allclose(thresholds, expected, rtol=1e-6)


def test_refuses_something_that_is_not_a_clipper():
    with pytest.raises(TypeError, match="build_clipper"):
        AdaptiveGradientClipping({"method": "autoclip"})


class TwoOptimizers(Regression):
    """Manual optimization with one optimizer for the first layer and one for the rest."""

    def __init__(self):
        super().__init__(8)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in self.optimizers():
            optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[:2].parameters(), lr=0.01), torch.optim.SGD(self.net[2:].parameters(), lr=0.01)


def test_manual_optimization_gives_each_optimizer_its_own_clipper(tmp_path):
    clipping = AdaptiveGradientClipping(AutoClip(percentile=50))
    model = TwoOptimizers()
    trainer(tmp_path, clipping, max_steps=3).fit(model)
    first, second = clipping._clippers
    assert first is not second and len(first.unit_names) == 1
    ids = [{id(p) for p in c._layout.params} for c in (first, second)]
    assert ids == [{id(p) for p in m.parameters()} for m in (model.net[:2], model.net[2:])]
    # each clipped every step of its own optimizer (Lightning counts both optimizers' steps in max_steps)
    assert first.history.counts.tolist() == second.history.counts.tolist() == [model.trainer.global_step // 2]


def test_resume_restores_every_optimizers_clipper(tmp_path):
    first_run = AdaptiveGradientClipping(AutoClip(percentile=50))
    trainer(tmp_path / "a", first_run, enable_checkpointing=True).fit(TwoOptimizers())
    (checkpoint,) = (tmp_path / "a").rglob("*.ckpt")
    saved = [c.state_dict()["state"]["values"] for c in first_run._clippers]
    assert not torch.equal(saved[0], saved[1])  # the two optimizers' histories differ
    resumed = AdaptiveGradientClipping(AutoClip(percentile=50))
    trainer(tmp_path / "b", resumed, max_epochs=2).fit(TwoOptimizers(), ckpt_path=checkpoint)
    for clipper, own, other in zip(resumed._clippers, saved, saved[::-1]):
        history = clipper.state_dict()["state"]["values"]
        assert history.shape[1] == 2 * own.shape[1]  # epoch 1 restored, epoch 2 added
        assert torch.isin(own, history).all() and not torch.isin(other, history).all()


def test_the_hook_and_its_logging_never_sync_with_the_host(tmp_path, monkeypatch):
    """Inside the hook, every way a tensor reaches the host raises; Lightning converts only when a logger writes."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside on_before_optimizer_step")

    class Watched(AdaptiveGradientClipping):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            with monkeypatch.context() as patch:
                for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
                    patch.setattr(torch.Tensor, name, refuse)
                super().on_before_optimizer_step(trainer, pl_module, optimizer)

    clipping = Watched(AutoClip(percentile=10, granularity="layer"))
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, clipping, logger=logger, log_every_n_steps=3).fit(Regression(8))
    assert clipping._steps == 8
    assert "clip/clip_rate" in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
