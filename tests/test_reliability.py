"""Faults and resumes: a killed worker, a changed world size, a checkpoint of another clipper, non-finite storms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hf_fit import dataset as hf_dataset
from hf_fit import model as hf_model
from hf_fit import training_arguments
from lightning_fit import Recorder, Regression
from test_hf import launch as launch_hf
from test_lightning import launch as launch_lightning
from test_lightning import trainer as lightning_trainer
from transformers import Trainer

from clipintegrations import AutoClip, PercentileClip, ZClip
from clipintegrations.lightning import AdaptiveGradientClipping

CLIPPER = json.dumps({"method": "autoclip", "percentile": 50})


# -- a worker killed after a checkpoint -------------------------------------------------------------
@pytest.mark.distributed
def test_hf_run_whose_worker_is_killed_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["--save-steps", "4", "--clipper", CLIPPER]
    whole = launch_hf(tmp_path / "whole", *args, launcher="torchrun")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(Path(__file__).parent / "hf_fit.py"),
    ]
    killed = subprocess.run(
        [*command, "--out", str(tmp_path / "killed"), *args, "--kill-at-step", "6"], capture_output=True, text=True
    )
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr  # rank 1 died at step 6; torchrun stopped rank 0
    assert not list((tmp_path / "killed").glob("rank*.json"))
    checkpoint = tmp_path / "killed" / "trainer" / "checkpoint-4"
    resumed = launch_hf(tmp_path / "resumed", *args, "--resume", str(checkpoint), launcher="torchrun")
    for rank in (0, 1):
        assert resumed[rank]["thresholds"] == whole[rank]["thresholds"][4:]  # to the bit
        assert resumed[rank]["weights"] == whole[rank]["weights"]
        assert resumed[rank]["clipper_state"] == whole[rank]["clipper_state"]


# -- resuming on another number of processes --------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_hf_checkpoint_resumes_on_another_number_of_processes(tmp_path, saved_on, resumed_on):
    def run(out: Path, processes: int, *extra: str) -> dict:
        batch = ["--batch-size", str(16 // processes), "--clipper", CLIPPER, *extra]
        return launch_hf(out, *batch, launcher="torchrun" if processes == 2 else None)[0]

    whole = run(tmp_path / "whole", saved_on, "--save-steps", "6")
    checkpoint = tmp_path / "whole" / "trainer" / "checkpoint-6"
    saved = torch.load(checkpoint / "clipintegrations_state.pt", weights_only=True)
    resumed = run(tmp_path / "resumed", resumed_on, "--resume", str(checkpoint))
    assert resumed["world_size"] == resumed_on
    restored = torch.tensor(resumed["clipper_state"]["values"])
    assert resumed["clipper_state"]["counts"] == [12]
    assert torch.isin(saved["clipper"]["state"]["values"], restored).all()  # carried over unchanged
    torch.testing.assert_close(
        torch.tensor(resumed["thresholds"]), torch.tensor(whole["thresholds"][6:]), rtol=1e-5, atol=0
    )


@pytest.mark.distributed
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_lightning_checkpoint_resumes_on_another_number_of_processes(tmp_path, saved_on, resumed_on):
    def run(out: Path, devices: int, *extra: str) -> dict:
        args = ["--batch-size", str(8 // devices), "--clipper", CLIPPER, *extra]
        if devices == 2:
            args += ["--strategy", "ddp", "--devices", "2"]
        return launch_lightning(out, *args)[0]

    whole = run(tmp_path / "whole", saved_on, "--epochs", "3")
    checkpoint = next((tmp_path / "whole" / "checkpoints").glob("epoch=0*.ckpt"))
    saved = torch.load(checkpoint, weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("AdaptiveGradientClipping")]
    resumed = run(tmp_path / "resumed", resumed_on, "--epochs", "3", "--ckpt-path", str(checkpoint))
    steps = len(whole["thresholds"]) // 3
    restored = resumed["clipper_state"]["clippers"][0]["state"]
    assert restored["counts"] == [3 * steps]
    assert torch.isin(state["clippers"][0]["state"]["values"], torch.tensor(restored["values"])).all()
    torch.testing.assert_close(
        torch.tensor(resumed["thresholds"]), torch.tensor(whole["thresholds"][steps:]), rtol=1e-5, atol=0
    )


# -- a checkpoint of another clipper, or of none -----------------------------------------------------
def test_hf_resume_with_another_clipper_names_both(tmp_path):
    launch_hf(tmp_path / "whole", "--save-steps", "6", "--clipper", CLIPPER, "--epochs", "1")
    other = json.dumps({"method": "autoclip", "percentile": 50, "granularity": "layer"})
    checkpoint = str(tmp_path / "whole" / "trainer" / "checkpoint-6")
    with pytest.raises(AssertionError, match=r"granularity='global' but this clipper has granularity='layer'"):
        launch_hf(tmp_path / "resumed", "--clipper", other, "--resume", checkpoint)


def test_hf_resume_from_a_checkpoint_without_clipping_warns_and_starts_fresh(tmp_path):
    plain = Trainer(
        model=hf_model(),
        args=training_arguments(tmp_path / "plain", save_strategy="steps", save_steps=6, max_steps=6),
        train_dataset=hf_dataset(),
    )
    plain.train()
    command = [sys.executable, str(Path(__file__).parent / "hf_fit.py"), "--out", str(tmp_path / "resumed")]
    result = subprocess.run(
        [*command, "--clipper", CLIPPER, "--resume", str(tmp_path / "plain" / "checkpoint-6")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without clipping state" in result.stderr
    resumed = json.loads((tmp_path / "resumed" / "rank0.json").read_text())
    assert resumed["clipper_state"]["counts"] == [len(resumed["thresholds"])] == [18]  # a fresh history


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (ZClip(), "holds clipping state for AdaptiveGradientClipping.*'method': 'autoclip'.*but this run clips with"),
        (AutoClip(percentile=10, granularity="layer"), "but this run clips with .*'granularity': 'layer'"),
    ],
)
def test_lightning_resume_with_another_clipper_names_both(tmp_path, other, message):
    launch_lightning(tmp_path / "whole", "--epochs", "1", "--clipper", CLIPPER)
    checkpoint = next((tmp_path / "whole" / "checkpoints").glob("*.ckpt"))
    with pytest.raises(ValueError, match=message):
        lightning_trainer(tmp_path, AdaptiveGradientClipping(other), max_epochs=2).fit(
            Regression(4), ckpt_path=checkpoint
        )


def test_lightning_resume_on_a_model_with_other_layers_names_both(tmp_path):
    layer = json.dumps({"method": "autoclip", "percentile": 50, "granularity": "layer"})
    launch_lightning(tmp_path / "whole", "--epochs", "1", "--clipper", layer)
    checkpoint = torch.load(next((tmp_path / "whole" / "checkpoints").glob("*.ckpt")), weights_only=True)
    clipping = AdaptiveGradientClipping(AutoClip(percentile=50, granularity="layer"))
    clipping.load_state_dict(next(v for k, v in checkpoint["callbacks"].items() if k == clipping.state_key))
    wider = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 1))  # 2 layers, not 3
    wider(torch.randn(4, 16)).sum().backward()
    with pytest.raises(ValueError, match=r"has 3 units \('net.0', 'net.2', 'net.4'\).*this model has 2 units"):
        clipping.clipper.clip_(wider)


def test_lightning_resume_from_a_checkpoint_without_clipping_warns(tmp_path):
    plain = lightning_trainer(tmp_path, L.Callback(), max_epochs=1, enable_checkpointing=True)
    plain.fit(Regression(4))
    checkpoint = next(Path(plain.checkpoint_callback.dirpath).glob("*.ckpt"))
    clipping = AdaptiveGradientClipping(AutoClip(percentile=50))
    with pytest.warns(UserWarning, match="no clipping state"):
        lightning_trainer(tmp_path, clipping, max_epochs=2).fit(Regression(4), ckpt_path=checkpoint)
    assert clipping.clipper.state_dict()["state"]["counts"].tolist() == [16]  # the second epoch only


# -- non-finite storms ------------------------------------------------------------------------------
STORM = ",".join(str(step) for step in range(5, 15))  # 10 consecutive optimizer steps


@pytest.mark.parametrize("nonfinite", ["zero", "keep"])
def test_hf_nan_storm_of_ten_steps(tmp_path, nonfinite):
    clipper = json.dumps({"method": "autoclip", "percentile": 50, "nonfinite": nonfinite})
    (run,) = launch_hf(tmp_path, "--clipper", clipper, "--nan-steps", STORM)
    norms = np.array(run["norms"], dtype=float)
    assert np.isnan(norms[4:14]).all() and np.isfinite(norms[:4]).all()
    weights = np.concatenate([np.ravel(w) for w in run["weights"].values()])
    if nonfinite == "zero":  # the storm's steps change nothing; training goes on
        assert np.isfinite(norms[14:]).all() and np.isfinite(weights).all()
        assert run["clipper_state"]["counts"] == [24 - 10]  # the history holds only finite steps
        finite = norms[np.isfinite(norms)]
        expected = [np.percentile(finite[: i + 1], 50) for i in range(len(finite))]
        np.testing.assert_allclose(np.array(run["thresholds"])[np.isfinite(norms)], expected, rtol=1e-5)
    else:  # "keep" leaves NaN gradients to the optimizer, as documented: the weights become NaN
        assert np.isnan(weights).any()
        assert run["clipper_state"]["counts"] == [4]  # and still no NaN enters the history


class NaNStorm(L.Callback):
    """NaN (or Inf in one layer only) gradients on the given optimizer steps, before the clip."""

    def __init__(self, steps: range, value: float, only_first_layer: bool = False) -> None:
        self.steps, self.value, self.only_first_layer = steps, value, only_first_layer

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step + 1 in self.steps:
            params = list(pl_module.net[0].parameters()) if self.only_first_layer else pl_module.parameters()
            for param in params:
                param.grad.fill_(self.value)


@pytest.mark.parametrize(
    ("value", "only_first_layer", "granularity"),
    [(float("nan"), False, "global"), (float("inf"), True, "layer"), (float("-inf"), True, "global")],
)
def test_lightning_non_finite_storm_keeps_the_history_clean(tmp_path, value, only_first_layer, granularity):
    clipping = AdaptiveGradientClipping(
        PercentileClip(percentile=90, window=8, warmup_steps=2, granularity=granularity)
    )
    recorder = Recorder(clipping, tmp_path)
    storm = NaNStorm(range(5, 15), value, only_first_layer)
    model = Regression(4)
    lightning_trainer(tmp_path, clipping, callbacks=[storm, recorder], max_epochs=2).fit(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # "zero" made the storm harmless
    norms = torch.tensor(recorder.norms)
    step_finite = torch.isfinite(norms).reshape(len(norms), -1).all(dim=1)
    assert (~step_finite).sum() == 10 and step_finite[14:].all()  # training went on after the storm
    written = clipping.clipper.state_dict()["state"]["written"]
    assert (written == int(step_finite.sum())).all()  # no unit recorded a storm step, not even the finite layers
    ring = clipping.clipper.state_dict()["state"]["ring"]
    assert torch.isfinite(ring).all()


def test_lightning_fp16_overflow_burst_stays_out_of_the_history(tmp_path):
    """GradScaler(init_scale=2**22) overflows for a burst of steps, backing off until it fits."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    clipping = AdaptiveGradientClipping(AutoClip(percentile=50, nonfinite="keep"))
    recorder = Recorder(clipping, tmp_path)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**22))
    model = Regression(8)
    lightning_trainer(tmp_path, clipping, callbacks=[recorder], plugins=[plugin], max_epochs=4).fit(model)
    norms = torch.tensor(recorder.norms)
    finite = torch.isfinite(norms)
    assert (~finite[:5]).all() and finite[-5:].all()  # a burst of overflows at the start, then normal steps
    assert clipping.clipper.state_dict()["state"]["counts"].tolist() == [int(finite.sum())]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the scaler skipped those steps
