"""The catalogue of bad input through YAML configs and the recipe command line (the Python API's is in test_build).

Every case must fail with one message that names the key and shows the value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from test_build import BAD

from clipintegrations import AutoClip
from clipintegrations.runs import parse_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import finetune_asr_hf  # noqa: E402
import finetune_lm_hf  # noqa: E402
import finetune_lm_lightning  # noqa: E402

# The core's bad configs, as recipe keys: `percentile` is `clip_percentile` in a config file.
CLIP_CASES = [
    ({f"clip_{k}": v for k, v in config.items()}, f"clip_{bad}")
    for config, _, _ in BAD
    if isinstance(config, dict) and "method" in config and "10" not in config.values()  # "10" is a number in text
    for bad in [next((k for k in config if k != "method"), "max_norm" if config["method"] == "fixed" else "method")]
]
RECIPE_CASES = [
    (finetune_lm_hf, {"task": "translation"}, "task"),
    (finetune_lm_hf, {"eval_fraction": 1.5}, "eval_fraction"),
    (finetune_lm_hf, {"max_length": 1}, "max_length"),
    (finetune_lm_hf, {"random_init_config": "{not json"}, "random_init_config"),
    (finetune_lm_hf, {"learning_rate": "fast"}, "learning_rate"),
    (finetune_lm_hf, {"lr_scheduler_type": "sawtooth"}, "sawtooth"),
    (finetune_lm_hf, {"clip_log": "maybe"}, "clip_log"),
    (finetune_lm_lightning, {"strategy": "deepspeed"}, "strategy"),
    (finetune_lm_lightning, {"devices": 0}, "devices"),
    (finetune_lm_lightning, {"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    (finetune_asr_hf, {"random_init_config": "[1, 2"}, "random_init_config"),
    (finetune_asr_hf, {"per_device_train_batch_size": "many"}, "per_device_train_batch_size"),
]
CASES = [(finetune_lm_hf, values, key) for values, key in CLIP_CASES] + RECIPE_CASES


def refusal(recipe, argv: list[str], capsys) -> str:
    """The message the recipe's config parsing refuses ``argv`` with (an exception, or argparse's exit)."""
    with pytest.raises((ValueError, TypeError, SystemExit)) as info:
        parse_config(recipe.ARGUMENTS, argv)
    return str(info.value) + capsys.readouterr().err


@pytest.mark.parametrize(("recipe", "values", "key"), CASES, ids=[f"{r.__name__}:{v}" for r, v, _ in CASES])
def test_a_bad_value_in_a_config_file_is_refused_by_name(tmp_path, capsys, recipe, values, key):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "use_cpu": True, **values}))
    if recipe is finetune_lm_lightning:
        config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), **values}))
    message = refusal(recipe, ["--config", str(config)], capsys)
    assert key in message, message


@pytest.mark.parametrize(("recipe", "values", "key"), CASES, ids=[f"{r.__name__}:{v}" for r, v, _ in CASES])
def test_a_bad_value_on_the_command_line_is_refused_by_name(tmp_path, capsys, recipe, values, key):
    argv = ["--output_dir", str(tmp_path)] + [token for k, v in values.items() for token in (f"--{k}", str(v))]
    message = refusal(recipe, argv, capsys)
    assert key in message, message


@pytest.mark.parametrize("log", ["yes", 1, None])
def test_callback_options_are_checked(log):
    from clipintegrations.hf import AdaptiveGradientClippingCallback
    from clipintegrations.lightning import AdaptiveGradientClipping

    for callback in (AdaptiveGradientClipping, AdaptiveGradientClippingCallback):
        with pytest.raises(TypeError, match=rf"`log` must be True or False; got {log!r}"):
            callback(AutoClip(), log=log)
