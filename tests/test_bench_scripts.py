"""The GPU benchmark script runs end to end (tiny shapes, CPU; LoRA and QLoRA), so it works the first time
a GPU is lent."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_train_gpu_bench_runs_every_variant_on_tiny_shapes():
    command = [sys.executable, str(REPO / "bench" / "train_gpu.py"), "--tiny", "--device", "cpu"]
    command += ["--mode", "both", "--steps", "2", "--samples", "24", "--max-len", "64"]
    command += ["--batch", "4", "--rows", "1", "--row-len", "128"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)

    assert done.returncode == 0, done.stderr[-2000:]
    for mode in ("lora", "qlora"):  # QLoRA's NF4 path runs on bitsandbytes' CPU backend
        rows = [line for line in done.stdout.splitlines() if line.startswith(f"| {mode} |")]
        assert len(rows) == 2 and "baseline" in rows[0] and "project" in rows[1]
        assert "1.00×" in rows[0]  # the baseline row is its own reference


def test_store_bench_measures_both_durability_settings(tmp_path: Path):
    command = [sys.executable, str(REPO / "bench" / "store.py"), "--messages", "20", "--trials", "1"]
    command += ["--dir", str(tmp_path)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)

    assert done.returncode == 0, done.stderr[-2000:]
    assert "| plain SQLite (WAL) |" in done.stdout and "| SQLCipher (WAL) |" in done.stdout


@pytest.mark.e2e
def test_serve_retrain_bench_measures_both_phases_inside_their_windows(tmp_path: Path):
    """A real bot and a real `twin retrain --now` (a tiny random model), one idle and one retrain phase."""
    command = [sys.executable, str(REPO / "bench" / "serve_retrain.py"), "--tiny", "--workdir", str(tmp_path)]
    command += ["--rounds", "1", "--messages", "3", "--friends", "2", "--max-tokens", "8"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "3 of 3" in rows["idle 1"] and "of 3" in rows["retrain 1"]
    assert "**retrain / idle**" in rows
    assert "Goal p95(retrain) ≤ 1.5 × p95(idle)" in done.stdout
    # Read from the running cycle: TWIN_RETRAIN_NICE's default, and the threads this checkout's
    # retrain gives its training child (TWIN_RETRAIN_THREADS 0: the cores the bot leaves, ≥ 1).
    assert re.search(r"niceness 10, torch threads [1-9]\d* ", done.stdout), done.stdout[-2000:]
    status = json.loads((tmp_path / "models" / "retrain-status.json").read_text())
    assert status["state"] == "failed" and "interrupted" in status["reason"]  # stopped, not finished


def test_context_ablation_trains_and_scores_each_variant_side_by_side(tmp_path: Path):
    command = [sys.executable, str(REPO / "bench" / "context_ablation.py"), "--quick", "--dir", str(tmp_path)]
    command += ["--variants", "none,examples"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)

    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        line
        for line in done.stdout.splitlines()
        if line.startswith("| none |") or line.startswith("| examples |")
    ]
    assert len(rows) == 2 and "`examples=3`" in rows[1]
    for row in rows:
        perplexities = [float(cell) for cell in row.split("|")[4:6]]
        assert all(p > 1 for p in perplexities)  # measured, not placeholders


def test_context_ablation_refuses_an_unknown_variant_before_any_work(tmp_path: Path):
    command = [sys.executable, str(REPO / "bench" / "context_ablation.py"), "--quick", "--dir", str(tmp_path)]
    command += ["--variants", "none,examples+jokes"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)

    assert done.returncode != 0
    assert "unknown part 'jokes' in 'examples+jokes'" in done.stderr
    assert list(tmp_path.iterdir()) == []
