"""The README's commands are the ones CI runs, and the main job runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    found = dict(re.findall(r"\*\*Run the (main job|tests)\*\*.*?```bash\n(.+?)\n```", text, re.S))
    assert set(found) == {"main job", "tests"}, found
    return found


def test_readme_opens_with_the_two_commands_from_a_fresh_venv():
    for command in readme_commands().values():
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0")


def test_main_job_runs_and_clipping_beats_no_clipping(tmp_path):
    script = readme_commands()["main job"].rsplit("&& ", 1)[1].split()
    assert script[0] == "python"
    result = subprocess.run(
        [sys.executable, *script[1:], "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    losses = dict(
        re.findall(r"^\s+(no clipping|AutoClip\(.*?\)|predict the mean):\s+([\d.naninf]+)", result.stdout, re.M)
    )
    assert float(losses["no clipping"]) > float(losses["predict the mean"]), result.stdout
    clipped = next(float(v) for k, v in losses.items() if k.startswith("AutoClip"))
    assert clipped < float(losses["predict the mean"]), result.stdout
    assert (tmp_path / "clip_history.json").exists()
