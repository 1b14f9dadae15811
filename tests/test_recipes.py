"""The recipes and configs: every config validates, and each recipe runs under torchrun and accelerate launch."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from transformers import HfArgumentParser

from clipintegrations.runs import parse_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
sys.path.insert(0, str(ROOT / "recipes"))  # the recipes import their neighbours, as when run as scripts

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
    ],
}
TINY_GPT2 = '{"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}'
TINY_WAV2VEC2 = json.dumps(
    {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": [16] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "mask_time_prob": 0.0,
    }
)


def recipe_of(config: Path) -> str:
    """The recipe that the config's header launches."""
    return re.search(r"recipes/(finetune_\w+)\.py", config.read_text()).group(1)


def test_there_is_a_config_for_every_recipe():
    recipes = {p.stem for p in (ROOT / "recipes").glob("finetune_*.py")}
    assert recipes == {recipe_of(c) for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_every_config_loads_and_validates(config):
    recipe = importlib.import_module(recipe_of(config))
    argv = ["--config", str(config)]
    if "use_cpu" in {a.dest for a in HfArgumentParser(recipe.ARGUMENTS)._actions} and not torch.cuda.is_available():
        argv += ["--use_cpu", "true"]  # TrainingArguments refuses a GPU config's bf16 on a machine without GPUs
    parsed = parse_config(recipe.ARGUMENTS, argv)
    clipping = next(p for p in parsed if type(p).__name__ == "ClippingArguments")
    clipper = clipping.build_clipper()
    assert clipper.method == clipping.clip_method
    text = config.read_text()
    assert text.startswith("#") and "torchrun --nproc_per_node" in text and "accelerate launch" in text
    if "max_grad_norm" in {f for p in parsed for f in vars(p)}:
        assert next(p for p in parsed if hasattr(p, "max_grad_norm")).max_grad_norm == 0


def test_command_line_overrides_the_config_and_unknown_keys_are_refused(tmp_path):
    recipe = importlib.import_module("finetune_lm_hf")
    config = ROOT / "configs" / "sentiment" / "minilm_autoclip.yaml"
    model, data, clipping, training = parse_config(
        recipe.ARGUMENTS, ["--config", str(config), "--clip_percentile", "25", "--learning_rate", "3e-4"]
    )
    assert clipping.clip_percentile == 25 and training.learning_rate == 3e-4 and data.dataset == "vader"
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text() + "clip_percentil: 20\n")
    with pytest.raises(ValueError, match=r"unknown keys in .*bad.yaml: \['clip_percentil'\]"):
        parse_config(recipe.ARGUMENTS, ["--config", str(bad)])
    with pytest.raises(ValueError, match=r"unknown command-line arguments: \['--lerning_rate', '1'\]"):
        parse_config(recipe.ARGUMENTS, ["--config", str(config), "--lerning_rate", "1"])
    with pytest.raises(ValueError, match=r"`clip_percentile` must be a number in \(0.0, 100.0\]; got 0.0"):
        parse_config(recipe.ARGUMENTS, ["--config", str(config), "--clip_percentile", "0"])


def run_recipe(launcher: str, recipe: str, out: Path, *args: str) -> dict:
    command = [*LAUNCHERS[launcher], str(ROOT / "recipes" / f"{recipe}.py"), "--output_dir", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"plot: {out}" in result.stdout
    return check_run_directory(out)


def check_run_directory(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    history = json.loads((out / "clip_history.json").read_text())
    assert history == json.loads((out / "clip_history.rank1.json").read_text())  # every rank clipped alike
    assert len(history["norm"]) == metrics["optimizer_steps"] > 0
    png = out / "clip_history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[2] in (3, 4)
    assert (out / "config.yaml").exists()
    assert list(out.rglob("events.out.tfevents.*"))
    return metrics


@pytest.mark.recipe
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_lm_hf_recipe_fine_tunes_minilm_on_vader(tmp_path, launcher):
    config = ROOT / "configs" / "sentiment" / "minilm_autoclip.yaml"
    metrics = run_recipe(
        launcher,
        "finetune_lm_hf",
        tmp_path / "run",
        *("--config", str(config), "--max_train_samples", "256", "--max_eval_samples", "64"),
        *("--num_train_epochs", "1", "--logging_steps", "1", "--learning_rate", "3e-4", "--clip_percentile", "50"),
    )
    assert metrics["optimizer_steps"] == 4  # 256 rows / (2 processes x 32)
    assert {"eval_mse", "eval_pearson", "baseline_mse", "train_steps_per_second"} <= set(metrics)


@pytest.mark.recipe
def test_lm_hf_recipe_fine_tunes_a_tiny_decoder(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text())
    metrics = run_recipe(
        "accelerate",
        "finetune_lm_hf",
        tmp_path / "run",
        *("--task", "causal_lm", "--model_name_or_path", "minilm", "--random_init_type", "gpt2"),
        *("--random_init_config", TINY_GPT2, "--dataset", "text", "--data_files", str(text), "--max_length", "32"),
        *("--clip_method", "zclip", "--clip_warmup_steps", "2", "--max_grad_norm", "0", "--use_cpu", "true"),
        *(
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "6",
            "--report_to",
            "tensorboard",
            "--learning_rate",
            "1e-3",
        ),
    )
    assert metrics["optimizer_steps"] == 6
    assert metrics["eval_loss"] < metrics["eval_loss_before_training"]


@pytest.mark.recipe
@pytest.mark.parametrize(("launcher", "strategy"), [("torchrun", "ddp"), ("accelerate", "fsdp2")])
def test_lm_lightning_recipe_on_ddp_and_fsdp2(tmp_path, launcher, strategy):
    config = ROOT / "configs" / "sentiment_lightning" / "minilm_percentile.yaml"
    metrics = run_recipe(
        launcher,
        "finetune_lm_lightning",
        tmp_path / "run",
        *("--config", str(config), "--strategy", strategy, "--max_train_samples", "256", "--max_eval_samples", "64"),
        *("--num_train_epochs", "1", "--logging_steps", "1", "--clip_warmup_steps", "1", "--clip_window", "3"),
    )
    assert metrics["optimizer_steps"] == 4 and metrics["strategy"] == strategy
    assert {"eval_mse", "eval_pearson", "baseline_mse"} <= set(metrics)


@pytest.mark.recipe
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_asr_recipe_trains_ctc_on_espeak_speech(tmp_path, launcher):
    config = ROOT / "configs" / "asr" / "tiny_wav2vec2_zclip.yaml"
    metrics = run_recipe(
        launcher,
        "finetune_asr_hf",
        tmp_path / "run",
        *("--config", str(config), "--data_dir", str(tmp_path / "speech"), "--random_init_config", TINY_WAV2VEC2),
        *("--max_train_samples", "64", "--max_eval_samples", "16", "--max_steps", "8", "--clip_warmup_steps", "2"),
        *("--per_device_train_batch_size", "4", "--logging_steps", "1"),
    )
    assert metrics["optimizer_steps"] == 8
    assert metrics["eval_loss"] < metrics["eval_loss_before_training"]
    assert len(list((tmp_path / "speech" / "audio").glob("*.wav"))) == 600
