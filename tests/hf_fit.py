"""A real transformers Trainer run with AdaptiveGradientClippingCallback, run by the tests as its own process.

    python tests/hf_fit.py --out DIR                                  # one process
    torchrun --nproc_per_node 2 tests/hf_fit.py --out DIR             # DDP over gloo
    accelerate launch --cpu --num_processes 2 tests/hf_fit.py --out DIR

Each rank writes ``DIR/rank{r}.json``: the norm and threshold of every optimizer step, the
final weights and the Trainer's log history. The model is a tiny random-init BERT regressor
without dropout, so that runs on 1 and on 2 processes see the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from clipintegrations import build_clipper
from clipintegrations.hf import AdaptiveGradientClippingCallback


def dataset(size: int = 96) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 64, (size, 8), generator=generator)
    labels = (input_ids[:, 0] % 7).float() - 3.0
    labels[::13] *= 40.0  # outliers, so that every method clips
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})


def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=1,
        problem_type="regression",
    )
    bert = BertForSequenceClassification(config)
    # BERT's regression loss is a mean that ignores num_items_in_batch; a model that says it takes loss kwargs
    # gets its loss multiplied by the number of processes and not divided by the accumulation steps.
    bert.accepts_loss_kwargs = False
    return bert


class Recorder(TrainerCallback):
    """Reads what the clipping callback did on each step, and writes it at the end."""

    def __init__(self, trainer: Trainer, out: Path) -> None:
        self.trainer, self.out = trainer, out
        self.norms: list = []
        self.thresholds: list = []

    @property
    def clipping(self) -> AdaptiveGradientClippingCallback:
        # restore_callback_states_from_checkpoint replaces the callback with a new instance
        callbacks = self.trainer.callback_handler.callbacks
        return next(c for c in callbacks if isinstance(c, AdaptiveGradientClippingCallback))

    def on_optimizer_step(self, args, state, control, **kwargs):
        stats = self.clipping.last_stats
        self.norms.append(stats.norm.tolist())
        self.thresholds.append(stats.threshold.tolist())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        record = {
            "norms": self.norms,
            "thresholds": self.thresholds,
            "weights": {name: _full(p).tolist() for name, p in model.named_parameters()},
            "log_history": state.log_history,
            "world_size": args.world_size,
            "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters()),
            "clipper_state": {k: v.tolist() for k, v in self.clipping.clipper.state_dict()["state"].items()},
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{args.process_index}.json").write_text(json.dumps(record))


def training_arguments(output_dir: Path, **overrides) -> TrainingArguments:
    """Plain SGD at a constant rate, logging every step, on CPU unless a GPU is there."""
    defaults = dict(
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ and not torch.cuda.is_available() else None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **overrides})


class Faults(TrainerCallback):
    """Test faults: NaN gradients on chosen steps, and SIGKILL of this process at a chosen step."""

    def __init__(self, nan_steps: set[int], kill_at_step: int | None) -> None:
        self.nan_steps, self.kill_at_step, self.step = nan_steps, kill_at_step, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        next(model.parameters()).register_post_accumulate_grad_hook(self.poison)

    def poison(self, param) -> None:
        if self.step in self.nan_steps:
            param.grad.fill_(float("nan"))

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def _full(param):
    return param.full_tensor().detach() if hasattr(param, "full_tensor") else param.detach()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clipper", default='{"method": "autoclip", "percentile": 50}')
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--precision", choices=["32", "bf16", "fp16"], default="32")
    parser.add_argument("--max-grad-norm", type=float, default=0.0)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    parser.add_argument("--restore-callback-states", action="store_true")
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--nan-steps", default="", help="comma-separated optimizer steps with NaN gradients")
    parser.add_argument("--kill-at-step", type=int, default=None, help="SIGKILL the last rank after this step")
    parser.add_argument("--fsdp", type=int, choices=[0, 1, 2], default=0, help="FSDP version, 0 for none")
    args = parser.parse_args()

    clipping = AdaptiveGradientClippingCallback(build_clipper(json.loads(args.clipper)))
    training_args = training_arguments(
        args.out / "trainer",
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulate,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        max_grad_norm=args.max_grad_norm,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        restore_callback_states_from_checkpoint=args.restore_callback_states,
        report_to=args.report_to,
        **({"fsdp": True, "fsdp_config": {"fsdp_version": args.fsdp}} if args.fsdp else {}),
    )
    trainer = Trainer(model=model(), args=training_args, train_dataset=dataset(), callbacks=[clipping])
    trainer.add_callback(Recorder(trainer, args.out))
    nan_steps = {int(step) for step in args.nan_steps.split(",") if step}
    last_rank = training_args.process_index == training_args.world_size - 1
    trainer.add_callback(Faults(nan_steps, args.kill_at_step if last_rank else None))
    trainer.train(resume_from_checkpoint=args.resume)


if __name__ == "__main__":
    main()
