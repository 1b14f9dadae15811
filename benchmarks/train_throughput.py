"""Training steps per second with each clipper, in a real Lightning run and a real HF Trainer run.

    python benchmarks/train_throughput.py                 # 5 interleaved rounds of 60 timed steps
    python benchmarks/train_throughput.py --rounds 1 --steps 5   # a quick smoke run

The same small transformer (GPT-2: 4 layers, 128 wide, a character vocabulary; batch 16 x 64
tokens, AdamW, one process) trains with: no clipping, the trainer's built-in fixed clip
(``gradient_clip_val=1`` / ``max_grad_norm=1``), and each of our clippers through its callback.
Configurations run in interleaved rounds (this machine is shared and noisy); each reports the
median of its rounds as a ratio to the built-in clip measured in the same round. Writes
``benchmarks/results/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results")
CLIPPERS: dict[str, dict | None] = {
    "no clipping": None,
    "built-in clip 1.0": None,
    "FixedClip global": {"method": "fixed", "max_norm": 1.0},
    "AutoClip global": {"method": "autoclip", "percentile": 10},
    "PercentileClip global": {"method": "percentile", "percentile": 95, "window": 1000, "warmup_steps": 5},
    "ZClip global": {"method": "zclip", "warmup_steps": 5},
    "AutoClip global, nonfinite=keep": {"method": "autoclip", "percentile": 10, "nonfinite": "keep"},
    "AutoClip layer": {"method": "autoclip", "percentile": 10, "granularity": "layer"},
}


def model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=128, n_layer=4, n_head=4))


def windows(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (count, 64), generator=generator)


def hf_steps_per_second(name: str, steps: int, warmup: int, out: Path) -> float:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from clipintegrations.hf import AdaptiveGradientClippingCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = time.perf_counter()
            if state.global_step == warmup + steps:
                self.seconds = time.perf_counter() - self.start

    timer = Timer()
    data = Dataset.from_dict({"input_ids": windows(16 * (steps + warmup)).tolist()})
    data = data.map(lambda row: {"labels": row["input_ids"]})
    args = TrainingArguments(
        str(out),
        per_device_train_batch_size=16,
        max_steps=steps + warmup,
        max_grad_norm=1.0 if name == "built-in clip 1.0" else 0.0,
        learning_rate=1e-4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
    )
    callbacks = [timer]
    if CLIPPERS[name]:
        callbacks.append(AdaptiveGradientClippingCallback(CLIPPERS[name]))
    Trainer(model=model(), args=args, train_dataset=data, callbacks=callbacks).train()
    return steps / timer.seconds


def lightning_steps_per_second(name: str, steps: int, warmup: int, out: Path) -> float:
    import lightning as L

    from clipintegrations import build_clipper
    from clipintegrations.lightning import AdaptiveGradientClipping

    class LanguageModel(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model()

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == warmup:
                self.start = time.perf_counter()
            if trainer.global_step == warmup + steps:
                self.seconds = time.perf_counter() - self.start

    timer = Timer()
    callbacks = [timer]
    if CLIPPERS[name]:
        callbacks.insert(0, AdaptiveGradientClipping(build_clipper(CLIPPERS[name])))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(windows(16 * (steps + warmup))), 16)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup,
        gradient_clip_val=1.0 if name == "built-in clip 1.0" else None,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(LanguageModel(), data)
    return steps / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    frameworks = {"lightning": lightning_steps_per_second, "hf": hf_steps_per_second}
    rates: dict[str, dict[str, list[float]]] = {f: {name: [] for name in CLIPPERS} for f in frameworks}
    scratch = args.out / "scratch"
    for round_ in range(args.rounds):
        for framework, measure in frameworks.items():
            for name in CLIPPERS:
                rates[framework][name].append(measure(name, args.steps, args.warmup, scratch))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    report = {}
    for framework in frameworks:
        builtin = rates[framework]["built-in clip 1.0"]
        report[framework] = {
            name: {
                "steps_per_second": statistics.median(values),
                "ratio_to_builtin": statistics.median(v / b for v, b in zip(values, builtin)),
                "rounds": values,
            }
            for name, values in rates[framework].items()
        }
    print("\n| clipper | Lightning steps/s | Lightning ratio | HF Trainer steps/s | HF ratio |\n|---|---|---|---|---|")
    for name in CLIPPERS:
        lightning, hf = report["lightning"][name], report["hf"][name]
        print(
            f"| {name} | {lightning['steps_per_second']:.2f} | {lightning['ratio_to_builtin']:.3f} "
            f"| {hf['steps_per_second']:.2f} | {hf['ratio_to_builtin']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_throughput.json").write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out)}, "report": report}, indent=1)
    )


if __name__ == "__main__":
    main()
