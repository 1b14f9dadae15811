"""AdaptiveGradientClippingCallback in a real transformers Trainer: launchers, accumulation, logs, resume, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from hf_fit import Recorder, dataset, model, training_arguments
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from clipintegrations import AutoClip, build_clipper
from clipintegrations.hf import STATE_FILE, AdaptiveGradientClippingCallback, ClippingArguments

SCRIPT = Path(__file__).with_name("hf_fit.py")
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    # --multi_gpu picks accelerate's multi-process launcher; with no GPU the processes run on CPU over gloo
    "accelerate": [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
    ],
}


def launch(out: Path, *args: str, launcher: str | None = None) -> list[dict]:
    """Run tests/hf_fit.py as users run a script: plainly, or under torchrun or accelerate launch."""
    command = [*LAUNCHERS.get(launcher, [sys.executable]), str(SCRIPT), "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def fit(tmp_path: Path, clipping: AdaptiveGradientClippingCallback, callbacks=(), **overrides) -> Trainer:
    trainer = Trainer(
        model=model(),
        args=training_arguments(tmp_path / "trainer", **overrides),
        train_dataset=dataset(),
        callbacks=[*callbacks, clipping],
    )
    trainer.add_callback(Recorder(trainer, tmp_path))
    trainer.train()
    return trainer


def recorded(trainer: Trainer) -> Recorder:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, Recorder))


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("launcher", "granularity"), [("torchrun", "global"), ("accelerate", "global"), ("torchrun", "layer")]
)
def test_every_rank_has_the_single_process_thresholds(tmp_path, launcher, granularity):
    clipper = json.dumps({"method": "autoclip", "percentile": 25, "granularity": granularity})
    (reference,) = launch(tmp_path / "single", "--batch-size", "16", "--clipper", clipper)
    rank0, rank1 = launch(tmp_path / launcher, "--batch-size", "8", "--clipper", clipper, launcher=launcher)
    assert rank0["world_size"] == 2
    assert rank0["thresholds"] == rank1["thresholds"]  # identical, to the bit
    assert rank0["norms"] == rank1["norms"]
    assert len(rank0["thresholds"]) == len(reference["thresholds"]) == 12
    torch.testing.assert_close(
        torch.tensor(rank0["thresholds"]), torch.tensor(reference["thresholds"]), rtol=1e-5, atol=0
    )
    for name, expected in reference["weights"].items():
        torch.testing.assert_close(torch.tensor(rank0["weights"][name]), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert (np.array(rank0["norms"]) > np.array(rank0["thresholds"])).any()  # it clipped


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate shards with FSDP only on GPUs; needs 2 GPUs")
@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_gives_the_single_process_thresholds(tmp_path, version):
    clipper = json.dumps({"method": "autoclip", "percentile": 25})
    (reference,) = launch(tmp_path / "single", "--batch-size", "16", "--clipper", clipper)
    rank0, rank1 = launch(tmp_path / "fsdp", "--fsdp", str(version), "--clipper", clipper, launcher="torchrun")
    assert rank0["thresholds"] == rank1["thresholds"]
    torch.testing.assert_close(
        torch.tensor(rank0["thresholds"]), torch.tensor(reference["thresholds"]), rtol=1e-4, atol=0
    )


def test_thresholds_are_autoclips_percentile_of_the_norms_seen(tmp_path):
    recorder = recorded(fit(tmp_path, AdaptiveGradientClippingCallback(AutoClip(percentile=30))))
    norms = np.array(recorder.norms)
    expected = [np.percentile(norms[: i + 1], 30) for i in range(len(norms))]
    np.testing.assert_allclose(recorder.thresholds, expected, rtol=1e-5)


def test_clips_once_per_optimizer_step_after_accumulation(tmp_path):
    batch = recorded(fit(tmp_path / "batch", AdaptiveGradientClippingCallback(AutoClip())))
    accumulated = recorded(
        fit(
            tmp_path / "accumulated",
            AdaptiveGradientClippingCallback(AutoClip()),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
        )
    )
    assert len(accumulated.norms) == len(batch.norms) == 24
    torch.testing.assert_close(torch.tensor(accumulated.thresholds), torch.tensor(batch.thresholds), rtol=1e-5, atol=0)


def test_bf16_on_cpu_clips_with_fp32_norms(tmp_path):
    clipping = AdaptiveGradientClippingCallback(AutoClip(percentile=50))
    fit(tmp_path, clipping, bf16=True)
    assert clipping.last_stats.norm.dtype == torch.float32
    assert clipping.clipper.state_dict()["state"]["counts"].tolist() == [24]


def test_metrics_reach_log_history_tensorboard_and_callbacks_listed_before_it(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class SeesLogs(TrainerCallback):
        logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    sees = SeesLogs()
    trainer = fit(tmp_path, AdaptiveGradientClippingCallback(AutoClip(percentile=10)), [sees], report_to="tensorboard")
    recorder = recorded(trainer)
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["clip/norm"] for entry in train_logs] == pytest.approx(recorder.norms, rel=1e-6)
    assert [entry["clip/threshold"] for entry in sees.logs if "loss" in entry] == pytest.approx(
        recorder.thresholds, rel=1e-6
    )
    events = EventAccumulator(str(next((tmp_path / "trainer").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/clip/norm", "train/clip/threshold", "train/clip/clip_rate"} <= set(events.Tags()["scalars"])
    thresholds = [e.value for e in events.Scalars("train/clip/threshold")]
    torch.testing.assert_close(torch.tensor(thresholds), torch.tensor(recorder.thresholds), rtol=1e-6, atol=0)
    clipped = [n > t for n, t in zip(recorder.norms, recorder.thresholds)]
    assert events.Scalars("train/clip/clip_rate")[-1].value == pytest.approx(sum(clipped) / len(clipped))


def test_event_order_clip_after_backward_and_accumulation_before_optimizer_step(tmp_path):
    events: list[str] = []

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            next(model.parameters()).register_post_accumulate_grad_hook(lambda p: events.append("backward"))
            optimizer.optimizer.register_step_pre_hook(lambda *a: events.append("optimizer.step"))

        def on_step_end(self, args, state, control, **kwargs):
            events.append("step end")

    class Clipping(AdaptiveGradientClippingCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):
            events.append("clip")
            super().on_pre_optimizer_step(*args, **kwargs)

    fit(tmp_path, Clipping(AutoClip()), [Watch()], gradient_accumulation_steps=2, max_steps=2)
    step = ["backward", "backward", "clip", "optimizer.step", "step end"]
    assert events == step + step


def test_resume_restores_the_clipper_with_or_without_the_restore_flag(tmp_path):
    (full,) = launch(tmp_path / "full", "--save-steps", "6", "--batch-size", "16")
    checkpoint = tmp_path / "full" / "trainer" / "checkpoint-6"
    for flag in ([], ["--restore-callback-states"]):
        (resumed,) = launch(tmp_path / f"resumed{flag}", "--batch-size", "16", "--resume", str(checkpoint), *flag)
        assert resumed["thresholds"] == full["thresholds"][6:]  # the same thresholds, to the bit
        assert resumed["weights"] == full["weights"]
        assert resumed["clipper_state"] == full["clipper_state"]
    # trainer_state.json holds the config and a pointer to the state file, never the history
    for steps in (6, 12):
        folder = tmp_path / "full" / "trainer" / f"checkpoint-{steps}"
        entry = json.loads((folder / "trainer_state.json").read_text())["stateful_callbacks"]
        assert entry["AdaptiveGradientClippingCallback"] == {
            "args": {"clipper": build_clipper({"method": "autoclip", "percentile": 50}).config(), "log": True},
            "attributes": {"checkpoint": {"file": STATE_FILE, "dir": str(folder), "steps": steps}},
        }
    saved = torch.load(tmp_path / "full" / "trainer" / "checkpoint-12" / STATE_FILE, weights_only=True)
    assert saved["clipper"]["state"]["counts"].tolist() == [12]


def test_resume_without_the_state_file_says_where_it_looked(tmp_path):
    launch(tmp_path / "full", "--save-steps", "6", "--batch-size", "16", "--epochs", "1")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "full" / "trainer" / "checkpoint-6", moved)
    shutil.rmtree(tmp_path / "full")
    (moved / STATE_FILE).unlink()
    clipping = AdaptiveGradientClippingCallback(AutoClip(percentile=50))
    trainer = Trainer(
        model=model(), args=training_arguments(tmp_path / "out"), train_dataset=dataset(), callbacks=[clipping]
    )
    with pytest.raises(FileNotFoundError, match=f"no {STATE_FILE}.*copy that file"):
        trainer.train(resume_from_checkpoint=str(moved))


def test_refuses_the_trainers_own_max_grad_norm(tmp_path):
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0.*set max_grad_norm=0"):
        fit(tmp_path, AdaptiveGradientClippingCallback(AutoClip()), max_grad_norm=1.0)


def test_refuses_deepspeed():
    """DeepSpeed cannot be installed on this CPU machine: arguments that name a DeepSpeed config stand in."""
    stand_in = SimpleNamespace(max_grad_norm=0.0, deepspeed="ds_config.json")
    with pytest.raises(ValueError, match="DeepSpeed owns the optimizer step"):
        AdaptiveGradientClippingCallback(AutoClip()).on_train_begin(stand_in, SimpleNamespace(), None)


def test_refuses_something_that_is_not_a_clipper():
    with pytest.raises(TypeError, match="must be a clipintegrations clipper"):
        AdaptiveGradientClippingCallback(torch.nn.utils.clip_grad_norm_)
    with pytest.raises(ValueError, match="`percentile` must be a number in"):
        AdaptiveGradientClippingCallback({"method": "autoclip", "percentile": 200})


def test_fp16_scaler_unscales_once_and_an_overflow_stays_out_of_the_history():
    """Accelerate makes no GradScaler on CPU, so the real GradScaler and AcceleratedOptimizer run without a Trainer."""
    layer = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), scaler=scaler)
    clipping = AdaptiveGradientClippingCallback(AutoClip(percentile=50))

    def step(x: torch.Tensor, *, trainer_unscaled: bool) -> None:
        optimizer.zero_grad()
        scaler.scale(layer(x).sum()).backward()
        if trainer_unscaled:
            scaler.unscale_(optimizer.optimizer)  # as Trainer._get_grad_norm does
        clipping.on_pre_optimizer_step(None, None, None, model=layer, optimizer=optimizer)
        scaler.step(optimizer.optimizer)  # what AcceleratedOptimizer.step does on a sync step
        scaler.update()

    x = torch.ones(2, 4)
    step(x, trainer_unscaled=False)
    torch.testing.assert_close(clipping.last_stats.norm, torch.full((), float(np.sqrt(4 * 2**2 + 2**2))))
    step(x, trainer_unscaled=True)
    step(torch.full((2, 4), float("inf")), trainer_unscaled=False)
    assert not clipping.last_stats.norm.isfinite()
    assert clipping.clipper.state_dict()["state"]["counts"].tolist() == [2]  # the overflow step is not in the history
    assert scaler.get_scale() == 512.0  # the scaler saw the overflow and backed off


def test_the_hook_never_syncs_with_the_host(tmp_path, monkeypatch):
    """Inside the hook, every way a tensor reaches the host raises; only logging reads the values."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside on_pre_optimizer_step")

    class Watched(AdaptiveGradientClippingCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):
            with monkeypatch.context() as patch:
                for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
                    patch.setattr(torch.Tensor, name, refuse)
                super().on_pre_optimizer_step(*args, **kwargs)

    clipping = Watched(AutoClip(percentile=10, granularity="layer"))
    trainer = fit(tmp_path, clipping, max_steps=6, logging_steps=3)
    assert clipping._steps == 6
    assert [e["step"] for e in trainer.state.log_history if "clip/clip_rate" in e] == [3, 6]


def test_clipping_arguments_parse_from_the_command_line_and_yaml(tmp_path):
    parser = HfArgumentParser((ClippingArguments, TrainingArguments))
    clipping, training = parser.parse_args_into_dataclasses(
        ["--clip_method", "percentile", "--clip_percentile", "90", "--clip_window", "50", "--output_dir", "o"]
    )
    assert (
        clipping.build_clipper().config()
        == build_clipper({"method": "percentile", "percentile": 90, "window": 50}).config()
    )
    config = tmp_path / "clip.yaml"
    config.write_text("clip_method: zclip\nclip_z_thresh: 3.0\nclip_granularity: layer\noutput_dir: o\n")
    clipping, training = parser.parse_yaml_file(str(config))
    callback = AdaptiveGradientClippingCallback.from_arguments(clipping)
    expected = build_clipper({"method": "zclip", "z_thresh": 3.0, "granularity": "layer"})
    assert callback.clipper.config() == expected.config()


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"clip_percentile": 120}, ValueError, r"`clip_percentile` must be a number in \(0.0, 100.0\]; got 120"),
        ({"clip_method": "autoclip", "clip_window": 10}, ValueError, "clip_window=10 does not apply to clip_method="),
        ({"clip_method": "median"}, ValueError, "`clip_method` must be one of"),
        ({"clip_method": "percentile", "clip_window": 0}, ValueError, "`clip_window` must be an integer >= 1; got 0"),
        ({"clip_granularity": "block"}, ValueError, "`clip_granularity` must be one of"),
    ],
)
def test_clipping_arguments_name_the_bad_key(arguments, error, message):
    with pytest.raises(error, match=message):
        ClippingArguments(**arguments)
