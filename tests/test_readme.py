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


def test_main_job_runs_and_beats_the_baseline(tmp_path):
    """The README's main job, on a tenth of its data (the full run is in the README and issue notes)."""
    job = readme_commands()["main job"].rsplit("&& ", 1)[1].split()
    assert job[:3] == ["torchrun", "--nproc_per_node", "2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", *job[1:]]
    shorter = ["--max_train_samples", "1024", "--num_train_epochs", "1", "--output_dir", str(tmp_path / "run")]
    result = subprocess.run([*launcher, *shorter], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    mse, baseline = map(
        float, re.search(r"eval MSE ([\d.]+) \(predict-the-mean baseline: ([\d.]+)\)", result.stdout).groups()
    )
    assert mse < baseline, result.stdout
    assert f"plot: {tmp_path / 'run' / 'clip_history.png'}" in result.stdout
