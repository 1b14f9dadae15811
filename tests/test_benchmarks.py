"""The benchmark scripts run end to end on tiny settings and write their results (the figures are in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, out: Path, *args: str) -> str:
    command = [sys.executable, str(BENCHMARKS / script), "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.benchmark
def test_stability_sweep_writes_its_table_and_plot(tmp_path):
    output = run("stability.py", tmp_path, "--tasks", "adding", "--seeds", "0", "--rates", "1", "--steps", "25")
    results = json.loads((tmp_path / "stability.json").read_text())
    table = results["summary"]["adding"]["table"]
    assert [row["method"] for row in table][:2] == ["none", "fixed 0.1"] and len(table) == 9
    assert len(results["runs"]) == 9 and all(len(r["losses"]) == 25 for r in results["runs"])
    assert (tmp_path / "stability_adding.png").read_bytes()[:4] == b"\x89PNG"
    assert "| AutoClip p10 |" in output


@pytest.mark.benchmark
def test_soak_reports_memory_and_step_times(tmp_path):
    run("soak.py", tmp_path, "--steps", "1100")
    rows = json.loads((tmp_path / "soak.json").read_text())
    for row in rows:
        # what the clipper holds is what its history keeps, plus small per-unit counters and a 256-norm block
        assert row["state_bytes"] <= row["history_bytes_expected"] + 1100 * row["units"] + 2048, row


@pytest.mark.benchmark
def test_train_throughput_measures_every_clipper_in_both_trainers(tmp_path):
    output = run("train_throughput.py", tmp_path, "--rounds", "1", "--steps", "2", "--warmup", "1")
    report = json.loads((tmp_path / "train_throughput.json").read_text())["report"]
    for framework in ("lightning", "hf"):
        assert report[framework]["built-in clip 1.0"]["ratio_to_builtin"] == 1.0
        assert all(entry["steps_per_second"] > 0 for entry in report[framework].values())
    assert "| AutoClip global |" in output
