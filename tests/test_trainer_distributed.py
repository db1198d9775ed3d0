"""Two CPU processes (torchrun, gloo; what `accelerate launch` does on GPUs) train one run together."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from trainer.tiny import cached_tiny_model, fixture_cache_dir

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_train_one_run(request, tmp_path):
    tiny = cached_tiny_model(fixture_cache_dir(request))
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"第{i}个问题"},
                {"role": "assistant", "content": "好耶" * (1 + i % 3)},
            ]
        }
        for i in range(16)
    ]
    (data / "train.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8"
    )
    run = tmp_path / "run"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    launch += [
        "-m",
        "deploy",
        "train",
        "--data",
        str(data),
        "-o",
        str(run),
    ]
    launch += [
        "--base-model",
        str(tiny),
        "--max-steps",
        "3",
        "--batch-size",
        "1",
        "--max-seq-len",
        "64",
        "--quiet",
    ]

    done = subprocess.run(
        launch,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
