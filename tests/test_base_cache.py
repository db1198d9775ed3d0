"""A GGUF base is de-quantised once into a cached HF copy that train, eval and export share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer import models
from trainer.models import BaseModelRef, hf_copy, load_model, load_tokenizer
from trainer.tiny import cached_tiny_model, fixture_cache_dir


@pytest.fixture(scope="module")
def tiny_gguf(request, tmp_path_factory) -> Path:
    """The tiny random Llama written as an F16 GGUF by llama.cpp's own converter."""
    from trainer.export import CONVERTER_FILES, _run_converter

    tiny = cached_tiny_model(fixture_cache_dir(request))
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    _run_converter(CONVERTER_FILES[0], [str(tiny), "--outfile", str(out), "--outtype", "f16"])
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QQ_TWIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_base_is_converted_once_into_a_private_copy_with_the_same_weights(tiny_gguf, cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = BaseModelRef(str(tiny_gguf.parent), tiny_gguf.name, "tiny")
    first = hf_copy(base)
    config = Path(first.source) / "config.json"
    made = config.stat().st_mtime_ns
    cached, tokenizer = load_model(base, dtype=torch.float32), load_tokenizer(base)

    assert hf_copy(base) == first and first.gguf_file is None and first.name == "tiny"
    assert config.stat().st_mtime_ns == made  # reused, not rewritten
    assert Path(first.source).parent == cache / "bases"
    assert os.stat(first.source).st_mode & 0o077 == 0
    assert not [p for p in (cache / "bases").iterdir() if p.name.endswith(".tmp")]
    # Exactly what transformers reads from the GGUF itself.
    direct = AutoModelForCausalLM.from_pretrained(base.source, gguf_file=base.gguf_file, dtype=torch.float32)
    expected, got = direct.state_dict(), cached.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    reference = AutoTokenizer.from_pretrained(base.source, gguf_file=base.gguf_file)
    text = "在吗 hello [表情:微笑]"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.chat_template == reference.chat_template


def test_a_changed_gguf_gets_a_new_copy_and_a_hf_base_is_used_as_it_is(cache, tmp_path, monkeypatch):
    converted: list[str] = []

    def fake_save(base: BaseModelRef, dest: Path) -> None:
        converted.append(base.source)
        (dest / "config.json").write_text("{}", encoding="utf-8")

    monkeypatch.setattr(models, "_save_dequantised", fake_save)
    gguf = tmp_path / "a" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF one")
    one = hf_copy(BaseModelRef(str(gguf.parent), gguf.name))
    again = hf_copy(BaseModelRef(str(gguf.parent), gguf.name))
    gguf.write_bytes(b"GGUF two, longer")
    changed = hf_copy(BaseModelRef(str(gguf.parent), gguf.name))
    hub = BaseModelRef("/some/hf/dir", None, "x")

    assert one == again and changed.source != one.source and len(converted) == 2
    assert hf_copy(hub) is hub
