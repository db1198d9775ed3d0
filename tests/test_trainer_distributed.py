"""Two CPU processes over gloo (what `accelerate launch` starts on GPUs) train one run together, and a
killed FSDP2 run resumes from its last checkpoint onto the loss curve of an unbroken DDP run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from trainer.tiny import cached_tiny_model, fixture_cache_dir

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# accelerate turns FSDP on only for GPU backends (a CPU process group stays MULTI_CPU even under
# deploy/accelerate/fsdp.yaml), so this launcher switches it on after the accelerator is built;
# the FSDP2 plugin is read from the FSDP_* variables that `accelerate launch` set from the yaml.
# Everything else is the real `twin train` on torch's FSDP2 (fully_shard, DTensor) over gloo.
FSDP_ON_CPU = """
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

import trainer.train
from deploy.cli import main


def fsdp_accelerator():
    accelerator = accelerate.Accelerator(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState copies it
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    prepare = accelerator.prepare

    def prepare_and_check(*objects):
        prepared = prepare(*objects)
        lora = next(p for p in prepared[0].parameters() if p.requires_grad)
        assert accelerator.is_fsdp2 and isinstance(lora, DTensor), "the model was not sharded by FSDP2"
        return prepared

    accelerator.prepare = prepare_and_check
    return accelerator


trainer.train._accelerator = fsdp_accelerator
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def launched(command: list[str]) -> Iterator[subprocess.Popen]:
    """Start a launcher in a session of its own; it and every process below it are killed on the way out."""
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, start_new_session=True)
    try:
        yield proc
    finally:
        kill_everything_under(proc.pid)
        proc.wait()


def kill_everything_under(pid: int) -> None:
    """SIGKILL a launcher and all its descendants. torchrun starts each worker in a session of its own,
    so killing the launcher's process group alone would leave the workers training on."""
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGSTOP)  # no new workers from here on
    try:
        below = [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        below = []
    for member in [pid, *below]:
        with suppress(ProcessLookupError):
            os.killpg(os.getpgid(member), signal.SIGKILL)


def run_to_completion(command: list[str], timeout: float = 300) -> int:
    with launched(command) as proc:
        return proc.wait(timeout=timeout)


@pytest.fixture
def tiny(request) -> Path:
    return cached_tiny_model(fixture_cache_dir(request))


@pytest.fixture
def data(tmp_path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"第{i}个问题"},
                {"role": "assistant", "content": "好耶" * (1 + i % 3)},
            ]
        }
        for i in range(16)
    ]
    (directory / "train.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8"
    )
    return directory


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text("save_every: 2\nbatch_size: 1\nmax_seq_len: 64\nthreads: 1\n", encoding="utf-8")
    return path


def train_args(data: Path, run: Path, tiny: Path, config: Path, steps: int) -> list[str]:
    args = ["train", "--data", str(data), "-o", str(run), "--base-model", str(tiny)]
    return [*args, "--config", str(config), "--max-steps", str(steps), "--quiet"]


def torchrun() -> list[str]:
    """Two plain data-parallel (DDP) processes, as `accelerate launch` with ddp.yaml starts them."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*launch, "--master_port", str(free_port()), "-m", "deploy"]


def accelerate_fsdp(launcher: Path) -> list[str]:
    """`accelerate launch` with deploy/accelerate/fsdp.yaml on two CPU processes, through FSDP_ON_CPU."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    launch += ["--config_file", str(REPO / "deploy/accelerate/fsdp.yaml"), "--mixed_precision", "no"]
    return [*launch, "--main_process_port", str(free_port()), str(launcher)]


def test_two_cpu_processes_train_one_run(tiny, data, config, tmp_path):
    run = tmp_path / "run"

    assert run_to_completion(torchrun() + train_args(data, run, tiny, config, steps=3)) == 0

    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_killed_fsdp2_run_resumes_and_saves_the_same_adapter_as_one_process(tiny, data, config, tmp_path):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer.config import TrainSettings
    from trainer.models import load_model, resolve_base
    from trainer.train import train

    launcher = tmp_path / "fsdp_on_cpu.py"
    launcher.write_text(FSDP_ON_CPU, encoding="utf-8")
    run = tmp_path / "fsdp-run"
    command = accelerate_fsdp(launcher) + train_args(data, run, tiny, config, steps=24)

    with launched(command) as proc:
        deadline = time.monotonic() + 240
        while not list((run / "checkpoints").glob("step-*/trainer_state.pt")):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()

    assert run_to_completion(command) == 0  # the same command again continues the run
    ddp = tmp_path / "ddp-run"
    assert run_to_completion(torchrun() + train_args(data, ddp, tiny, config, steps=24)) == 0

    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["processes"] == 2 and metrics["resumed_from_step"] >= 2
    assert [point["step"] for point in metrics["loss_curve"]] == list(range(1, 25))
    # Weights, optimizer moments, schedule and data order all came back, and sharding changed none of
    # the arithmetic (gradient clipping included): the curve is an unbroken DDP run's.
    unbroken = json.loads((ddp / "metrics.json").read_text(encoding="utf-8"))
    losses = [point["loss"] for point in metrics["loss_curve"]]
    assert losses == pytest.approx([point["loss"] for point in unbroken["loss_curve"]], abs=1e-4)

    sharded = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    one_process = TrainSettings(
        base_model=str(tiny),
        data=data,
        output_dir=tmp_path / "one-process",
        max_steps=2,
        max_seq_len=64,
        threads=1,
    )
    single = load_file(str(train(one_process, progress=False).adapter_dir / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in single.items()}
    assert any(v.abs().sum() > 0 for k, v in sharded.items() if "lora_B" in k)  # trained, not the init

    twin = PeftModel.from_pretrained(
        load_model(resolve_base(str(tiny)), dtype=torch.float32), str(run / "adapter")
    )
    loaded = get_peft_model_state_dict(twin)
    assert loaded.keys() == sharded.keys()
    assert all(torch.equal(loaded[k], sharded[k]) for k in sharded)
