"""Generate a small spoken-word dataset with espeak-ng: real synthetic speech, no download.

    python recipes/make_speech_data.py data/spoken_words      # needs: apt-get install espeak-ng

Every word of ``WORDS`` is spoken by each accent of ``ACCENTS`` with each voice variant of
``VARIANTS``, at a speed and pitch drawn from a seeded generator, so the same command always
writes the same files. The held-out split is one voice variant (``EVAL_VARIANT``) that training
never hears. Writes 16 kHz mono WAV files and ``metadata.csv`` (``file_name``, ``text``,
``split``), which ``datasets.load_dataset("csv", ...)`` reads.
"""

from __future__ import annotations

import csv
import random
import shutil
import subprocess
import sys
import tempfile
from math import gcd
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "yes",
    "no",
    "up",
    "down",
    "left",
    "right",
    "on",
    "off",
    "stop",
    "go",
    "red",
    "green",
    "blue",
    "black",
    "white",
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
]
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029")
VARIANTS = ("m1", "m3", "m5", "f2", "f4")
EVAL_VARIANT = "f4"
SAMPLING_RATE = 16_000


def speak(text: str, voice: str, speed: int, pitch: int) -> tuple[int, np.ndarray]:
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed: apt-get install espeak-ng (Debian/Ubuntu)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as out:
        command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", out.name, text]
        subprocess.run(command, check=True, capture_output=True)
        return wavfile.read(out.name)


def resample(audio: np.ndarray, rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
    factor = gcd(rate, target)
    return resample_poly(audio.astype(np.float32), target // factor, rate // factor).astype(np.float32)


def generate(folder: str | Path, seed: int = 0) -> Path:
    """Write the dataset into ``folder`` (skipped when its ``metadata.csv`` exists) and return the csv's path."""
    folder = Path(folder)
    metadata = folder / "metadata.csv"
    if metadata.exists():
        return metadata
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    draw = random.Random(seed)
    rows = []
    for accent in ACCENTS:
        for variant in VARIANTS:
            for word in WORDS:
                speed, pitch = draw.randint(130, 190), draw.randint(30, 70)
                rate, audio = speak(word, f"{accent}+{variant}", speed, pitch)
                name = f"audio/{word}_{accent}_{variant}.wav"
                clip = resample(audio, rate) / 32768.0
                wavfile.write(folder / name, SAMPLING_RATE, (clip * 32767).astype(np.int16))
                rows.append({"file_name": name, "text": word, "split": "eval" if variant == EVAL_VARIANT else "train"})
    with open(metadata.with_suffix(".tmp"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)
    metadata.with_suffix(".tmp").rename(metadata)  # a complete dataset, or none
    return metadata


if __name__ == "__main__":
    path = generate(sys.argv[1] if len(sys.argv) > 1 else "data/spoken_words")
    print(f"wrote {path}")
