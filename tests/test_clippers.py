"""Each method's thresholds against an independent reference, and the scaling against torch's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import GRANULARITIES, backward, tiny_model, unit_norms_reference, zclip_reference

from clipintegrations import AutoClip, FixedClip, PercentileClip, ZClip
from clipintegrations.history import FullHistory


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("history_size", [None, 37])
def test_autoclip_threshold_is_numpy_percentile_of_recorded_norms(granularity, history_size):
    model, clipper = tiny_model(), AutoClip(percentile=10, history_size=history_size, granularity=granularity)
    seen = []
    # 600 steps cross two merges of the full history's sorted blocks.
    for step in range(600):
        backward(model, step)
        seen.append(unit_norms_reference(model, granularity))
        stats = clipper.clip_(model)
        kept = np.array(seen if history_size is None else seen[-history_size:])
        expected = np.percentile(kept, 10, axis=0)
        np.testing.assert_allclose(np.atleast_1d(stats.threshold.numpy()), expected, rtol=1e-6)
        np.testing.assert_allclose(np.atleast_1d(stats.norm.numpy()), seen[-1], rtol=1e-5)


@pytest.mark.parametrize("percentile", [0.5, 25, 50, 99.9, 100])
def test_full_history_matches_numpy_with_ties_and_every_block_fill(percentile):
    torch.manual_seed(1)
    history = FullHistory(num_units=3, device=torch.device("cpu"))
    values = torch.randint(0, 40, (900, 3)).float()  # many ties
    for i, row in enumerate(values):
        history.record(row, torch.ones(3, dtype=torch.bool))
        if i % 97 == 0 or i > 880:
            expected = np.percentile(values[: i + 1].numpy(), percentile, axis=0)
            np.testing.assert_allclose(history.percentile(percentile / 100).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_percentile_clip_uses_window_before_the_current_norm(granularity):
    model = tiny_model()
    clipper = PercentileClip(percentile=90, window=8, warmup_steps=4, factor=1.5, granularity=granularity)
    seen = []
    for step in range(40):
        backward(model, step)
        norms = unit_norms_reference(model, granularity)
        stats = clipper.clip_(model)
        if len(seen) < 4:
            expected = np.full_like(norms, np.inf)
        else:
            expected = 1.5 * np.percentile(np.array(seen[-8:]), 90, axis=0)
        np.testing.assert_allclose(np.atleast_1d(stats.threshold.numpy()), expected, rtol=1e-6)
        seen.append(norms)


@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_zclip_matches_the_papers_algorithm(granularity):
    model, clipper = tiny_model(), ZClip(alpha=0.9, z_thresh=1.5, warmup_steps=5, granularity=granularity)
    norms, thresholds = [], []
    for step in range(60):
        backward(model, step)
        norms.append(unit_norms_reference(model, granularity))
        thresholds.append(np.atleast_1d(clipper.clip_(model).threshold.numpy()))
    norms, thresholds = np.array(norms), np.array(thresholds)
    assert np.isfinite(thresholds[5:]).all()
    for unit in range(norms.shape[1]):
        expected = zclip_reference(list(norms[:, unit]), alpha=0.9, z_thresh=1.5, warmup=5)
        np.testing.assert_allclose(thresholds[:, unit], expected, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_clip_gives_the_gradients_of_clip_grad_norm(dtype):
    model = tiny_model().to(dtype)
    reference = copy.deepcopy(model)
    for step in range(5):
        backward(model, step)
        backward(reference, step)
        stats = FixedClip(max_norm=0.3).clip_(model)
        total = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.3)
        torch.testing.assert_close(stats.norm, total.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_layer_granularity_clips_each_layer_to_its_own_threshold():
    model = tiny_model()
    backward(model, 6)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = [torch.cat([p.grad.flatten() for p in m.parameters()]).norm() for m in layers]
    stats = FixedClip(max_norm=0.2, granularity="layer").clip_(model)
    after = [torch.cat([p.grad.flatten() for p in m.parameters()]).norm() for m in layers]
    for b, a, s in zip(before, after, stats.norm):
        torch.testing.assert_close(s, b)
        torch.testing.assert_close(a, torch.clamp(b, max=0.2), rtol=1e-5, atol=0)


def test_none_gradients_are_skipped_and_zero_norms_not_recorded():
    model = tiny_model()
    clipper = AutoClip(percentile=50, granularity="layer")
    backward(model, 0)
    model[4].weight.grad = None
    model[4].bias.grad = None
    stats = clipper.clip_(model)
    assert stats.norm[2] == 0 and torch.isinf(stats.threshold[2])  # nothing recorded for that layer
    backward(model, 1)
    stats = clipper.clip_(model)
    torch.testing.assert_close(stats.threshold[2], stats.norm[2])  # one norm recorded: its own


def test_layer_granularity_needs_the_module():
    with pytest.raises(TypeError, match="clip_\\(model\\)"):
        AutoClip(granularity="layer").clip_(tiny_model().parameters())


def test_clip_accepts_parameters_a_single_tensor_and_the_module_alike():
    model = tiny_model()
    results = []
    for source in (lambda: model, lambda: model.parameters(), lambda: list(model.parameters())):
        backward(model, 3)
        results.append(FixedClip(0.1).clip_(source()).norm)
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 4.0)
    FixedClip(1.0).clip_(w)
    torch.testing.assert_close(w.grad.norm(), torch.tensor(1.0))


def test_one_clipper_refuses_a_model_with_other_units():
    clipper, model = AutoClip(granularity="layer"), tiny_model()
    backward(model, 0)
    clipper.clip_(model)
    other = torch.nn.Linear(3, 3)
    other(torch.ones(1, 3)).sum().backward()
    with pytest.raises(ValueError, match="clipping units changed"):
        clipper.clip_(other)
