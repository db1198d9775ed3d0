"""Export on a tiny trained model: llama.cpp's own converter, quantisation, a real load and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.cli import main as twin
from pipeline.registry import gguf_name, resolve_model
from trainer.chat import ChatModel
from trainer.config import TrainSettings
from trainer.export import ensure_converter, export
from trainer.tiny import cached_tiny_model, fixture_cache_dir
from trainer.train import train


@pytest.fixture(scope="module")
def trained_run(request, tmp_path_factory) -> Path:
    tiny = cached_tiny_model(fixture_cache_dir(request))
    data = tmp_path_factory.mktemp("dataset")
    sample = {
        "messages": [
            {"role": "system", "content": "你是小明，正在QQ上和朋友聊天。"},
            {"role": "user", "content": "在吗"},
            {"role": "assistant", "content": "在的[贴贴]"},
        ]
    }
    (data / "train.jsonl").write_text(json.dumps(sample, ensure_ascii=False) + "\n", encoding="utf-8")
    run = tmp_path_factory.mktemp("runs") / "run"
    settings = TrainSettings(base_model=str(tiny), data=data, output_dir=run, max_steps=2, threads=1)
    train(settings, progress=False)
    return run


def test_export_converts_quantises_and_the_model_generates_in_llama_cpp(trained_run, tmp_path):
    converter = ensure_converter()
    out = tmp_path / "models" / "v1"

    result = export(trained_run, out, quants=("Q8_0", "Q4_K_M"), lora_gguf=True, progress=False, n_threads=1)

    assert converter.name == "convert_hf_to_gguf.py" and (converter.parent / "gguf-py").is_dir()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["gguf"] == {"Q8_0": gguf_name("Q8_0"), "Q4_K_M": gguf_name("Q4_K_M")}
    assert manifest["default_quant"] == "Q8_0"
    assert manifest["system_prompt"] == "你是小明，正在QQ上和朋友聊天。"
    assert manifest["dataset_hash"].startswith("sha256:") and manifest["metrics"]["steps"] == 2
    assert set(manifest["sizes"]) == {"model-Q8_0.gguf", "model-Q4_K_M.gguf", "adapter.gguf"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter.gguf").stat().st_size > 0
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./model-Q8_0.gguf" in modelfile and "<|im_start|>" in modelfile
    assert 'SYSTEM """你是小明' in modelfile
    assert set(result.samples) == {"Q8_0", "Q4_K_M"}  # each was loaded and generated during export
    assert not list(out.parent.glob(".v1.*"))  # no temp dirs left beside the model

    # The bot's model resolution finds it, and a chat round-trip through llama.cpp produces text.
    resolved = resolve_model(out)
    assert resolved.gguf == out / "model-Q8_0.gguf"
    with ChatModel(resolved.gguf, system=manifest["system_prompt"], n_threads=1, max_tokens=8) as chat:
        assert isinstance(chat.reply(["今晚吃火锅吗", "老地方"]), str)
        assert chat.prompt(chat.messages([])).startswith("<|im_start|>system\n你是小明")


def test_an_unknown_quant_type_is_one_line_exit_2_and_writes_nothing(trained_run, tmp_path, capsys):
    code = twin(["export", str(trained_run), "-o", str(tmp_path / "v1"), "--quant", "Q8_0,Q9_X"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Q9_X" in err
    assert not (tmp_path / "v1").exists()


def test_exporting_an_unfinished_run_is_an_input_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()

    assert twin(["export", str(tmp_path / "run"), "-o", str(tmp_path / "v1")]) == 2
    assert "not a finished training run" in capsys.readouterr().err
    assert not (tmp_path / "v1").exists()


def test_a_full_disk_during_export_is_one_line_and_writes_nothing(trained_run, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    import trainer.export

    def full_disk(*args, **kwargs):  # what safetensors raised on a full 512 KiB tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(trainer.export, "merge_adapter", full_disk)
    code = twin(["export", str(trained_run), "-o", str(tmp_path / "models" / "v1"), "--quant", "Q8_0"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no space left on device; nothing was written" in err
    assert not (tmp_path / "models" / "v1").exists()
    assert not list((tmp_path / "models").iterdir())  # no temp directory beside it either
