"""What the bot serves is resolved from a file, a model directory or a registry."""

from __future__ import annotations

import json

import pytest

from pipeline.registry import CURRENT_FILE, current_version, resolve_model
from pipeline.registry_ops import switch_current
from tests.gguf_helpers import write_gguf


def _model_dir(root, name, quants=("Q8_0",)):
    d = root / name
    d.mkdir(parents=True)
    for q in quants:
        write_gguf(d / f"model-{q}.gguf")
    (d / "manifest.json").write_text(
        json.dumps({"version": name, "gguf": {q: f"model-{q}.gguf" for q in quants}})
    )
    return d


def test_a_gguf_file_is_served_as_is(tmp_path):
    f = tmp_path / "twin.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(f).gguf == f


def test_a_model_directory_serves_its_preferred_quant(tmp_path):
    d = _model_dir(tmp_path, "v1", ("Q8_0", "Q4_K_M"))
    assert resolve_model(d).gguf.name == "model-Q4_K_M.gguf"
    assert resolve_model(d, quant="Q8_0").gguf.name == "model-Q8_0.gguf"


def test_a_registry_serves_its_current_version(tmp_path):
    _model_dir(tmp_path, "v1")
    _model_dir(tmp_path, "v2")
    switch_current(tmp_path, "v1", by="test")
    assert resolve_model(tmp_path).version == "v1"
    switch_current(tmp_path, "v2", by="test")
    assert current_version(tmp_path) == "v2"
    assert resolve_model(tmp_path).gguf == tmp_path / "v2" / "model-Q8_0.gguf"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_switching_to_a_missing_version_changes_nothing(tmp_path):
    _model_dir(tmp_path, "v1")
    switch_current(tmp_path, "v1", by="test")
    with pytest.raises(FileNotFoundError):
        switch_current(tmp_path, "v9", by="test")
    assert (tmp_path / CURRENT_FILE).read_text().strip() == "v1"
