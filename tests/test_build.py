"""build_clipper and the constructors: every bad value is named, with what is allowed."""

from __future__ import annotations

import pytest

from clipintegrations import METHODS, AutoClip, FixedClip, PercentileClip, ZClip, build_clipper


@pytest.mark.parametrize(
    ("config", "cls"),
    [
        ("autoclip", AutoClip),
        ({"method": "fixed", "max_norm": 1}, FixedClip),
        ({"method": "percentile", "percentile": 99, "window": 50, "warmup_steps": 5, "factor": 2}, PercentileClip),
        ({"method": "zclip", "alpha": 0.9, "z_thresh": 3, "warmup_steps": 10, "granularity": "layer"}, ZClip),
    ],
)
def test_build_makes_the_described_clipper(config, cls):
    clipper = build_clipper(config)
    assert type(clipper) is cls
    if isinstance(config, dict):
        assert {k: clipper.config()[k] for k in config} == config
    assert type(build_clipper(clipper.config())) is cls  # config() round-trips


BAD = [
    # (config, error type, words the message must hold)
    ({"method": "autoclip", "percentile": 0}, ValueError, ["`percentile`", "(0.0, 100.0]", "0"]),
    ({"method": "autoclip", "percentile": 100.5}, ValueError, ["`percentile`", "100.5"]),
    ({"method": "autoclip", "percentile": float("nan")}, ValueError, ["`percentile`", "nan"]),
    ({"method": "autoclip", "percentile": "10"}, TypeError, ["`percentile`", "'10'"]),
    ({"method": "autoclip", "percentile": True}, TypeError, ["`percentile`", "True"]),
    ({"method": "autoclip", "history_size": 0}, ValueError, ["`history_size`", ">= 1", "0"]),
    ({"method": "autoclip", "history_size": 10.0}, TypeError, ["`history_size`", "10.0"]),
    ({"method": "percentile", "window": 0}, ValueError, ["`window`", ">= 1", "0"]),
    ({"method": "percentile", "warmup_steps": -1}, ValueError, ["`warmup_steps`", "-1"]),
    ({"method": "percentile", "factor": 0}, ValueError, ["`factor`", "0"]),
    ({"method": "zclip", "alpha": 1.0}, ValueError, ["`alpha`", "(0.0, 1.0)", "1.0"]),
    ({"method": "zclip", "alpha": 0}, ValueError, ["`alpha`", "0"]),
    ({"method": "zclip", "z_thresh": -2}, ValueError, ["`z_thresh`", "-2"]),
    ({"method": "fixed", "max_norm": 0}, ValueError, ["`max_norm`", "0"]),
    ({"method": "fixed"}, TypeError, ["fixed", "max_norm"]),
    ({"method": "autoclip", "granularity": "block"}, ValueError, ["`granularity`", "'block'", "'layer'"]),
    ({"method": "autoclip", "granularity": 1}, TypeError, ["`granularity`", "1"]),
    ({"method": "autoclip", "nonfinite": "skip"}, ValueError, ["`nonfinite`", "'skip'", "'zero'"]),
    ({"method": "autoclip", "percentil": 10}, ValueError, ["'percentil'", "'percentile'"]),
    ({"method": "adaptive"}, ValueError, ["`method`", "'adaptive'", "'autoclip'"]),
    ({"percentile": 10}, ValueError, ["`method`", "'percentile'"]),
    ("auto", ValueError, ["`method`", "'auto'"]),
    (["autoclip"], TypeError, ["mapping", "['autoclip']"]),
]


@pytest.mark.parametrize(("config", "error", "words"), BAD, ids=[str(c) for c, _, _ in BAD])
def test_bad_config_is_refused_naming_key_value_and_allowed(config, error, words):
    with pytest.raises(error) as info:
        build_clipper(config)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_every_method_is_buildable_by_name_but_fixed_needs_max_norm():
    for name in METHODS:
        if name == "fixed":
            with pytest.raises(TypeError, match="max_norm"):
                build_clipper(name)
        else:
            assert build_clipper(name).method == name
