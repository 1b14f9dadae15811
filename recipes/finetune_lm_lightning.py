"""Fine-tune a language model with PyTorch Lightning and adaptive gradient clipping, on DDP or FSDP2.

    torchrun --nproc_per_node 2 recipes/finetune_lm_lightning.py \
        --config configs/sentiment_lightning/minilm_percentile.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune_lm_lightning.py --config <the same>
    python recipes/finetune_lm_lightning.py --config <the same> --strategy fsdp2 --devices 2

The model, data and tasks are those of ``finetune_lm_hf.py`` (see ``lm_data.py``). ``strategy``
picks ``ddp`` or ``fsdp2`` (``ModelParallelStrategy``, each transformer block sharded with
``fully_shard``). Under ``torchrun`` or ``accelerate launch`` Lightning joins the processes they
started; run plainly, it starts ``devices`` processes itself. The run directory gets the same files
as the HF recipe's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import lightning as L
import torch
from lm_data import (
    DataArguments,
    ModelArguments,
    baseline,
    build_model,
    load_splits,
    resolve_model_path,
    summary,
    tokenize,
)
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorWithPadding, get_scheduler

from clipintegrations import ClippingArguments
from clipintegrations.lightning import AdaptiveGradientClipping
from clipintegrations.runs import ClipHistory, parse_config, write_run

STRATEGIES = ("auto", "ddp", "fsdp2")


@dataclass
class LightningArguments:
    output_dir: str = field(default="runs/lm_lightning", metadata={"help": "The run directory."})
    strategy: str = field(default="ddp", metadata={"help": f"One of {STRATEGIES}."})
    accelerator: str = field(default="cpu", metadata={"help": "cpu or gpu."})
    devices: int = field(default=1, metadata={"help": "Processes per node when run plainly (torchrun sets its own)."})
    precision: str = field(default="32-true", metadata={"help": "32-true, bf16-mixed or 16-mixed."})
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs over the training set."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: no limit)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Examples per process and micro-batch."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Examples per eval batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW's peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW's weight decay."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "A transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the model head and the data order."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A Lightning .ckpt to resume."})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}; got {self.strategy!r}")
        for name in ("devices", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {getattr(self, name)}")


class LanguageModelTask(L.LightningModule):
    def __init__(self, model: torch.nn.Module, args: LightningArguments) -> None:
        super().__init__()
        self.model, self.args = model, args
        self.model.train()  # from_pretrained returns the model in eval mode (dropout off)

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:  # not FSDP2
            return
        from torch.distributed.fsdp import fully_shard

        blocks = set(self.model._no_split_modules or [])  # the transformer block classes, as HF names them
        for module in self.model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = get_scheduler(self.args.lr_scheduler_type, optimizer, self.args.warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, task: str, device: torch.device) -> dict[str, float]:
    """The eval metric over the whole eval set, on every rank (FSDP2 needs every rank in each forward)."""
    model.eval()
    losses, predictions, labels = [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        losses.append(output.loss.float() * len(batch["labels"]))
        if task != "causal_lm":
            predictions.append(output.logits.float())
            labels.append(batch["labels"])
    metrics = {"eval_loss": (torch.stack(losses).sum() / len(loader.dataset)).item()}
    if task == "regression":
        predicted, target = torch.cat(predictions).reshape(-1), torch.cat(labels).float()
        metrics["eval_mse"] = (predicted - target).square().mean().item()
        metrics["eval_pearson"] = torch.corrcoef(torch.stack([predicted, target]))[0, 1].item()
    elif task == "classification":
        metrics["eval_accuracy"] = (torch.cat(predictions).argmax(-1) == torch.cat(labels)).float().mean().item()
    else:
        metrics["eval_perplexity"] = float(torch.tensor(metrics["eval_loss"]).exp())
    return metrics


ARGUMENTS = (ModelArguments, DataArguments, ClippingArguments, LightningArguments)
"""What a config file of this recipe holds, in order."""


def main() -> None:
    model_args, data_args, clip_args, args = parse_config(ARGUMENTS)
    L.seed_everything(args.seed, workers=True)
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = load_splits(data_args, args.seed)
    for name, limit in (("train", data_args.max_train_samples), ("eval", data_args.max_eval_samples)):
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
    task = model_args.task
    num_labels, reference = 1, {}
    if task != "causal_lm":
        train_labels, eval_labels = splits["train"][data_args.label_column], splits["eval"][data_args.label_column]
        num_labels = 1 if task == "regression" else int(max(train_labels)) + 1
        reference = {f"baseline_{k}": v for k, v in baseline(task, train_labels, eval_labels).items()}
    data = tokenize(splits, tokenizer, task, data_args)
    mlm = task == "causal_lm"
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False) if mlm else DataCollatorWithPadding(tokenizer)
    train = DataLoader(data["train"], args.per_device_train_batch_size, shuffle=True, collate_fn=collator)
    held_out = DataLoader(data["eval"], args.per_device_eval_batch_size, collate_fn=collator)

    devices = int(os.environ.get("LOCAL_WORLD_SIZE", args.devices))  # torchrun and accelerate launch set it
    num_nodes = int(os.environ.get("WORLD_SIZE", devices)) // devices
    strategy = args.strategy
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # "auto" would give every device of a node to tensor parallelism; FSDP2 shards over data parallelism
        strategy = ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
    history = ClipHistory()
    clipping = AdaptiveGradientClipping(clip_args.build_clipper(), log=clip_args.clip_log, history=history)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=args.precision,
        max_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.gradient_accumulation_steps,
        callbacks=[clipping],
        logger=L.pytorch.loggers.TensorBoardLogger(args.output_dir, name="tensorboard"),
        log_every_n_steps=args.logging_steps,
        default_root_dir=args.output_dir,
        enable_checkpointing=True,
    )
    module = LanguageModelTask(build_model(model_args, num_labels), args)
    if task == "causal_lm":
        reference = {
            "eval_loss_before_training": evaluate(module.model, held_out, task, torch.device("cpu"))["eval_loss"]
        }
    started = time.perf_counter()
    trainer.fit(module, train, ckpt_path=args.resume_from_checkpoint)
    seconds = time.perf_counter() - started
    evaluation = evaluate(module.model, held_out, task, module.device)
    metrics = {
        "task": task,
        **evaluation,
        **reference,
        "train_steps_per_second": trainer.global_step / seconds,
        "optimizer_steps": trainer.global_step,
        "world_size": trainer.world_size,
        "strategy": args.strategy,
        "clipper": repr(clipping.clipper),
    }
    plot = write_run(
        args.output_dir,
        rank=trainer.global_rank,
        config=(model_args, data_args, clip_args, args),
        metrics=metrics,
        history=history,
        title=f"{model_args.model_name_or_path} on {data_args.dataset} ({args.strategy}): {clipping.clipper!r}",
    )
    if plot is not None:
        print(summary(metrics, plot))


if __name__ == "__main__":
    main()
