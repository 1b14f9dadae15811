"""Checkpoints: a clipper that was saved and loaded continues exactly as one that never was."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import GRANULARITIES, all_clippers, backward, tiny_model

from clipintegrations import AutoClip, PercentileClip, ZClip, build_clipper


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("save_at", [0, 3, 300])
def test_round_trip_continues_with_identical_thresholds(granularity, save_at):
    model = tiny_model()
    for original in all_clippers(granularity):
        for step in range(save_at):
            backward(model, step)
            original.clip_(model)
        restored = build_clipper(original.config())
        restored.load_state_dict(_roundtrip(original.state_dict()))
        for step in range(save_at, save_at + 270):  # crosses a block merge of the full history
            backward(model, step)
            expected = original.clip_(model)
            backward(model, step)
            got = restored.clip_(model)
            torch.testing.assert_close(got.threshold, expected.threshold, rtol=0, atol=0)


def test_state_saved_on_one_device_loads_on_another():
    model = tiny_model()
    clipper = AutoClip(percentile=30, granularity="layer")
    for step in range(5):
        backward(model, step)
        clipper.clip_(model)
    state = _roundtrip(clipper.state_dict())
    assert all(t.device.type == "cpu" for t in state["state"].values())
    on_meta = AutoClip(percentile=30, granularity="layer")
    on_meta.load_state_dict(state)
    meta_model = tiny_model().to("meta")
    for p in meta_model.parameters():
        p.grad = torch.empty_like(p)
    assert on_meta.clip_(meta_model).threshold.device.type == "meta"
    assert on_meta.history.counts.device.type == "meta"


def test_state_is_plain_data_and_cpu_tensors():
    model = tiny_model()
    clipper = ZClip(warmup_steps=2)
    for step in range(4):
        backward(model, step)
        clipper.clip_(model)
    state = clipper.state_dict()
    assert state["format"] == 1 and state["config"]["method"] == "zclip" and state["units"] == ["global"]
    _roundtrip(state)  # weights_only=True accepts it


@pytest.mark.parametrize(
    ("saved", "loading", "match"),
    [
        (AutoClip(), ZClip(), "method='autoclip'.*method='zclip'"),
        (AutoClip(granularity="layer"), AutoClip(), "granularity='layer'.*granularity='global'"),
        (PercentileClip(window=10), PercentileClip(window=20), "window=10.*window=20"),
        (AutoClip(history_size=10), AutoClip(), "history_size=10.*history_size=None"),
    ],
)
def test_a_state_that_does_not_fit_names_both(saved, loading, match):
    model = tiny_model()
    backward(model, 0)
    saved.clip_(model)
    with pytest.raises(ValueError, match=match):
        loading.load_state_dict(saved.state_dict())
        loading.clip_(model)


def test_a_state_from_another_model_names_both_unit_lists():
    saved, model = AutoClip(granularity="layer"), tiny_model()
    backward(model, 0)
    saved.clip_(model)
    other = torch.nn.Linear(6, 2)
    other(torch.ones(1, 6)).sum().backward()
    loading = AutoClip(granularity="layer")
    loading.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="3 units.*1 units"):
        loading.clip_(other)


def test_a_state_saved_before_any_step_loads_as_fresh():
    fresh = AutoClip()
    loaded = AutoClip()
    loaded.load_state_dict(_roundtrip(fresh.state_dict()))
    model = tiny_model()
    backward(model, 0)
    got = loaded.clip_(model).threshold
    backward(model, 0)
    assert torch.equal(got, AutoClip().clip_(model).threshold)
