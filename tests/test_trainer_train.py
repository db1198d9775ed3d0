"""The training loop on a tiny random model: packing is exact, runs resume, bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deploy.cli import main as twin
from trainer.config import TrainSettings
from trainer.data import collate_padded, encode_all, epoch_batches
from trainer.models import load_model, load_tokenizer, resolve_base
from trainer.tiny import cached_tiny_model, fixture_cache_dir
from trainer.train import CHECKPOINTS_DIR, METRICS_FILE, owner_loss, train

REPO = Path(__file__).resolve().parents[1]
REPLIES = ["在的[贴贴]", "好耶", "哈哈哈 绝绝子", "不行\n明天吧", "[doge]", "冲冲冲"]
PROMPTS = ["在吗", "晚上吃火锅？", "看新闻了吗", "周末打游戏吗", "好累啊"]


@pytest.fixture(scope="module")
def tiny_model(request) -> Path:
    return cached_tiny_model(fixture_cache_dir(request))


def conversation(i: int) -> dict:
    messages = [{"role": "system", "content": "你是小明，正在QQ上和朋友聊天。"}]
    for turn in range(1 + i % 3):
        messages.append({"role": "user", "content": PROMPTS[(i + turn) % len(PROMPTS)]})
        messages.append({"role": "assistant", "content": REPLIES[(i * 7 + turn) % len(REPLIES)]})
    return {"messages": messages}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("dataset")
    for name, count in (("train.jsonl", 48), ("val.jsonl", 8)):
        lines = [json.dumps(conversation(i), ensure_ascii=False) for i in range(count)]
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def settings_for(tiny_model: Path, dataset: Path, run: Path, **extra) -> TrainSettings:
    values = dict(base_model=str(tiny_model), data=dataset, output_dir=run, max_steps=4, batch_size=2)
    values.update(max_seq_len=128, lr=1e-3, threads=1, save_every=2)
    values.update(extra)
    return TrainSettings(**values)


def test_packed_and_unpacked_batches_give_the_same_loss(tiny_model, dataset):
    from trainer.data import load_split

    base = resolve_base(str(tiny_model))
    tokenizer = load_tokenizer(base)
    samples = encode_all(tokenizer, load_split(dataset)[:6], max_len=128)
    model = load_model(base, dtype=torch.float32).eval()

    (packed,) = epoch_batches(samples, batch_size=8, row_len=512, pack=True, pad_id=0, seed=0)
    padded = collate_padded(samples, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        packed_sum, packed_count = owner_loss(model, packed)
        padded_sum, padded_count = owner_loss(model, padded)

    assert packed.input_ids.shape[0] == 1 < padded.input_ids.shape[0]  # six samples side by side in one row
    assert packed_count == padded_count
    torch.testing.assert_close(packed_sum / packed_count, padded_sum / padded_count, rtol=1e-5, atol=1e-5)


def test_a_run_writes_the_adapter_settings_and_metrics(tiny_model, dataset, tmp_path):
    result = train(settings_for(tiny_model, dataset, tmp_path / "run"), progress=False)

    run = tmp_path / "run"
    metrics = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "settings.json").read_text())["settings"]["max_steps"] == 4
    assert [point["step"] for point in metrics["loss_curve"]] == [1, 2, 3, 4]
    for key in ("train_tokens", "train_runtime_s", "tokens_per_s", "peak_rss_mb"):
        assert metrics[key] > 0
    assert result.steps == 4 and result.label_tokens < result.train_tokens
    assert not (run / CHECKPOINTS_DIR).exists()
    targets = json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert {name.rsplit(".", 1)[-1] for name in targets} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_model, dataset, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text("save_every: 2\nmax_seq_len: 128\nbatch_size: 2\nthreads: 1\n", encoding="utf-8")
    args = ["--data", str(dataset), "-o", str(run), "--base-model", str(tiny_model), "--config", str(config)]
    args += ["--max-steps", "150", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy", "train", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 240
        while not list((run / CHECKPOINTS_DIR).glob("step-*/trainer_state.pt")):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "adapter").exists() and not (run / METRICS_FILE).exists()

    # Re-running the same command (here through the Python API) continues, not restarts.
    settings = settings_for(tiny_model, dataset, run, max_steps=150, save_every=2)
    resumed = train(settings.model_copy(update={"max_steps": 150}), progress=False)

    metrics = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
    assert resumed.resumed_from_step >= 2
    steps = [point["step"] for point in metrics["loss_curve"]]
    assert steps == list(range(1, 151))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_missing_base_model_is_one_line_exit_2_and_no_run_dir(dataset, tmp_path, capsys):
    code = twin(["train", "--data", str(dataset), "-o", str(tmp_path / "run"), "--base-model", "/nope/model"])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("twin: error: /nope/model") and "not found" in err
    assert not (tmp_path / "run").exists()


def test_a_hub_model_not_in_the_cache_says_how_to_point_at_a_local_copy(
    dataset, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = twin(
        ["train", "--data", str(dataset), "-o", str(tmp_path / "run"), "--base-model", "nobody/no-model"]
    )

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "not found offline" in err and "--base-model /path/to/a/local/copy" in err
    assert not (tmp_path / "run").exists()


def test_qlora_without_cuda_is_a_clear_error(tiny_model, dataset, tmp_path, capsys, monkeypatch):
    from trainer import models

    monkeypatch.setattr(models, "QLORA_DEVICES", ())  # this device, even a GPU, offers no QLoRA
    code = twin(
        [
            "train",
            "--data",
            str(dataset),
            "-o",
            str(tmp_path / "run"),
            "--base-model",
            str(tiny_model),
            "--qlora",
        ]
    )

    assert code == 2
    assert "--qlora needs a CUDA GPU" in capsys.readouterr().err


def test_a_run_can_continue_an_existing_adapter_and_reports_each_step(tiny_model, dataset, tmp_path):
    from safetensors.torch import load_file

    first = train(settings_for(tiny_model, dataset, tmp_path / "first", lora_r=4), progress=False)
    steps: list[tuple[int, int, float]] = []
    second = train(
        settings_for(tiny_model, dataset, tmp_path / "second", max_steps=2, init_adapter=first.adapter_dir),
        progress=False,
        on_step=lambda step, total, loss: steps.append((step, total, loss)),
    )
    assert [(s, t) for s, t, _ in steps] == [(1, 2), (2, 2)]
    before = load_file(str(Path(first.adapter_dir) / "adapter_model.safetensors"))
    after = load_file(str(Path(second.adapter_dir) / "adapter_model.safetensors"))
    assert before.keys() == after.keys()  # the continued adapter keeps its own rank and targets
    assert all(after[k].shape == before[k].shape for k in before)
    assert all(v.shape[0] == 4 for k, v in after.items() if "lora_A" in k)


def test_continuing_something_that_is_not_an_adapter_is_one_line(tiny_model, dataset, tmp_path):
    run = tmp_path / "run"
    code = twin(
        [
            "train",
            "--data",
            str(dataset),
            "--base-model",
            str(tiny_model),
            "-o",
            str(run),
            "--max-steps",
            "1",
            "--init-adapter",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 2
    assert not (run / "adapter").exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_finished_run(
    tiny_model, dataset, tmp_path, monkeypatch, capsys
):
    from pipeline import files

    def full_disk(*args, **kwargs):  # what torch.save raised on a full 512 KiB tmpfs
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(files, "free_bytes", lambda where: 4096)
    run = tmp_path / "run"
    (tmp_path / "train.yaml").write_text("save_every: 1\nmax_seq_len: 128\nthreads: 1\n", encoding="utf-8")
    args = ["train", "--data", str(dataset), "-o", str(run), "--base-model", str(tiny_model)]
    code = twin([*args, "--config", str(tmp_path / "train.yaml"), "--max-steps", "4", "--quiet"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"{run}: no space left on device; the run is not finished" in err
    assert not (run / "adapter").exists() and not (run / METRICS_FILE).exists()
    assert not [p.name for p in run.rglob("*") if p.name.startswith(".")]  # no temp dirs left
    assert not list((run / CHECKPOINTS_DIR).glob("step-*"))


def test_the_qlora_path_trains_resumes_and_exports_on_bitsandbytes_cpu_backend(
    tiny_model, dataset, tmp_path, monkeypatch
):
    """`--qlora` end to end: the base loaded as 4-bit NF4 with double quantisation, k-bit
    preparation, LoRA on `Linear4bit`, a checkpoint and resume, then the adapter merged over
    the full-precision base and exported. The product offers `--qlora` only with CUDA, where
    bitsandbytes' kernels are fast; its CPU backend runs the same NF4 path, so this test opens
    that gate and exercises everything but the CUDA kernels."""
    import bitsandbytes  # noqa: F401  (the [dev] extra installs it)
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainer import models
    from trainer.export import export

    monkeypatch.setattr(models, "QLORA_DEVICES", ("cuda", "cpu"))
    settings = settings_for(tiny_model, dataset, tmp_path / "run", qlora=True, max_steps=4, save_every=2)
    loaded: list[str] = []
    real_load = models.load_model

    def load_and_record(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(type(model.model.layers[0].self_attn.q_proj).__name__)
        return model

    monkeypatch.setattr(models, "load_model", load_and_record)

    def crash_after_the_checkpoint(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt  # as if killed after the step-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(settings, progress=False, on_step=crash_after_the_checkpoint)
    resumed = train(settings, progress=False)

    assert loaded == ["Linear4bit", "Linear4bit"]
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    adapter = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in adapter) and all(v.dtype == torch.float32 for v in adapter.values())
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # it learned
    # The adapter trained over 4-bit weights loads over the full-precision base, as export merges it.
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(resumed.adapter_dir))
    result = export(resumed.run_dir, tmp_path / "v1", quants=("Q8_0",), progress=False, n_threads=1)
    assert result.samples["Q8_0"] is not None and result.gguf["Q8_0"].is_file()
