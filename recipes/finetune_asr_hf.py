"""Fine-tune a speech recogniser with CTC, the Hugging Face Trainer and adaptive gradient clipping.

    torchrun --nproc_per_node 2 recipes/finetune_asr_hf.py --config configs/asr/tiny_wav2vec2_zclip.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune_asr_hf.py --config <the same>

A wav2vec2-style model (``Wav2Vec2ForCTC``) learns characters with a CTC head; the character
vocabulary comes from the training transcripts, as in transformers' own CTC example. The data load
with ``datasets.load_dataset``: a hub name such as ``openslr/librispeech_asr`` (its ``audio`` column
decodes to arrays) or ``spoken_words``, the set that ``make_speech_data.py`` synthesises with
espeak-ng (WAV paths, generated on first use). The run directory gets the resolved config,
``metrics.json`` (eval loss before and after training, character error rate), TensorBoard events,
``clip_history.json`` and ``clip_history.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict, load_dataset
from make_speech_data import generate
from scipy.io import wavfile
from scipy.signal import resample_poly
from transformers import (
    Trainer,
    TrainingArguments,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    set_seed,
)

from clipintegrations.hf import AdaptiveGradientClippingCallback, ClippingArguments
from clipintegrations.runs import ClipHistory, evaluate_before_training, parse_config, write_run


@dataclass
class SpeechModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A pretrained wav2vec2 (hub name or folder); None builds random_init_config."}
    )
    random_init_config: str = field(default="{}", metadata={"help": "JSON Wav2Vec2Config overrides, from scratch."})
    freeze_feature_encoder: bool = field(default=True, metadata={"help": "Keep the convolutional encoder fixed."})

    def __post_init__(self) -> None:
        try:
            json.loads(self.random_init_config)
        except json.JSONDecodeError as error:
            raise ValueError(f"`random_init_config` must be a JSON object; got {self.random_init_config!r}") from error


@dataclass
class SpeechDataArguments:
    dataset: str = field(default="spoken_words", metadata={"help": "`spoken_words` (espeak-ng) or a hub name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's config name."})
    data_dir: str = field(default="data/spoken_words", metadata={"help": "Where spoken_words is generated."})
    train_split: str = field(default="train", metadata={"help": "The training split's name."})
    eval_split: str = field(default="eval", metadata={"help": "The held-out split's name."})
    audio_column: str = field(default="audio", metadata={"help": "Audio arrays, or WAV paths (spoken_words)."})
    text_column: str = field(default="text", metadata={"help": "The transcript."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})


def load_splits(data: SpeechDataArguments, sampling_rate: int) -> DatasetDict:
    if data.dataset == "spoken_words":
        metadata = generate(data.data_dir)
        table = load_dataset("csv", data_files=str(metadata))["train"]
        splits = DatasetDict(
            train=table.filter(lambda r: r["split"] == "train"), eval=table.filter(lambda r: r["split"] == "eval")
        )
        root = metadata.parent
    else:
        raw = load_dataset(data.dataset, data.dataset_config_name)
        splits, root = DatasetDict(train=raw[data.train_split], eval=raw[data.eval_split]), None
    for name, limit in (("train", data.max_train_samples), ("eval", data.max_eval_samples)):
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))

    def read(row):
        audio = row["file_name"] if root is not None else row[data.audio_column]
        if isinstance(audio, str):
            rate, samples = wavfile.read(root / audio)
            samples = samples.astype(np.float32) / 32768.0
        else:
            rate, samples = audio["sampling_rate"], np.asarray(audio["array"], dtype=np.float32)
        if rate != sampling_rate:
            samples = resample_poly(samples, sampling_rate, rate).astype(np.float32)
        return {"speech": samples, "transcript": row[data.text_column].lower()}

    return splits.map(read, remove_columns=splits["train"].column_names)


def character_tokenizer(transcripts: list[str], folder: Path) -> Wav2Vec2CTCTokenizer:
    """A CTC tokenizer over the characters of the training transcripts; ``|`` separates words."""
    characters = sorted(set("".join(transcripts)) - {" "})
    vocab = {c: i for i, c in enumerate(["<pad>", "<unk>", "|", *characters])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return Wav2Vec2CTCTokenizer(
        str(folder / "vocab.json"), pad_token="<pad>", unk_token="<unk>", word_delimiter_token="|"
    )


def build_model(arguments: SpeechModelArguments, tokenizer: Wav2Vec2CTCTokenizer) -> Wav2Vec2ForCTC:
    head = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "ctc_loss_reduction": "mean"}
    if arguments.model_name_or_path:
        model = Wav2Vec2ForCTC.from_pretrained(arguments.model_name_or_path, ignore_mismatched_sizes=True, **head)
    else:
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**json.loads(arguments.random_init_config), **head))
    if arguments.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model


class CTCCollator:
    """Pads audio with the feature extractor and transcripts with -100, which CTC ignores."""

    def __init__(self, features: Wav2Vec2FeatureExtractor, tokenizer: Wav2Vec2CTCTokenizer) -> None:
        self.features, self.tokenizer = features, tokenizer

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.features(
            [r["speech"] for r in rows], sampling_rate=self.features.sampling_rate, padding=True, return_tensors="pt"
        )
        labels = self.tokenizer([r["transcript"] for r in rows], padding=True, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        return batch


def character_error_rate(tokenizer: Wav2Vec2CTCTokenizer):
    def metrics(prediction):
        predicted = tokenizer.batch_decode(prediction.predictions.argmax(-1))
        labels = np.where(prediction.label_ids == -100, tokenizer.pad_token_id, prediction.label_ids)
        references = tokenizer.batch_decode(labels, group_tokens=False)
        errors = sum(edit_distance(p, r) for p, r in zip(predicted, references))
        return {"cer": errors / max(1, sum(len(r) for r in references))}

    return metrics


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


ARGUMENTS = (SpeechModelArguments, SpeechDataArguments, ClippingArguments, TrainingArguments)
"""What a config file of this recipe holds, in order."""


def main() -> None:
    model_args, data_args, clip_args, training_args = parse_config(ARGUMENTS)
    set_seed(training_args.seed)  # the same head (or random init) on every rank
    if model_args.model_name_or_path:
        features = Wav2Vec2FeatureExtractor.from_pretrained(model_args.model_name_or_path)
    else:
        features = Wav2Vec2FeatureExtractor(sampling_rate=16_000, do_normalize=True, return_attention_mask=True)
    with training_args.main_process_first(desc="speech data"):
        splits = load_splits(data_args, features.sampling_rate)
    tokenizer = character_tokenizer(splits["train"]["transcript"], Path(training_args.output_dir))
    splits = splits.map(lambda r: {"transcript": r["transcript"].replace(" ", "|")})
    history = ClipHistory()
    clipping = AdaptiveGradientClippingCallback.from_arguments(clip_args, history)
    training_args.remove_unused_columns = False  # the collator turns the raw speech and transcript into tensors
    trainer = Trainer(
        model=build_model(model_args, tokenizer),
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        data_collator=CTCCollator(features, tokenizer),
        compute_metrics=character_error_rate(tokenizer),
        callbacks=[clipping],
    )
    before = evaluate_before_training(trainer)
    trained = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = trainer.evaluate()
    metrics = {
        "task": "ctc",
        "eval_loss": after["eval_loss"],
        "eval_cer": after["eval_cer"],
        "eval_loss_before_training": before["eval_loss"],
        "eval_cer_before_training": before["eval_cer"],
        "train_loss": trained.training_loss,
        "train_steps_per_second": trained.metrics["train_steps_per_second"],
        "optimizer_steps": trainer.state.global_step,
        "world_size": training_args.world_size,
        "clipper": repr(clipping.clipper),
    }
    plot = write_run(
        training_args.output_dir,
        rank=training_args.process_index,
        config=(model_args, data_args, clip_args, training_args),
        metrics=metrics,
        history=history,
        title=f"{model_args.model_name_or_path or 'wav2vec2'} on {data_args.dataset}: {clipping.clipper!r}",
    )
    if plot is not None:
        print(
            f"eval CTC loss {metrics['eval_loss']:.3f} (before training: {metrics['eval_loss_before_training']:.3f}), "
            f"CER {metrics['eval_cer']:.3f} (before: {metrics['eval_cer_before_training']:.3f})\n"
            f"{metrics['optimizer_steps']} steps at {metrics['train_steps_per_second']:.2f} steps/s\nplot: {plot}"
        )


if __name__ == "__main__":
    main()
