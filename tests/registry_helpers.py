"""Model registries built in the test: versions with a GGUF, a PEFT adapter and a manifest."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.registry import lora_module_name
from pipeline.registry_ops import promote, register
from tests.gguf_helpers import write_gguf


def export_with_adapter(tmp_path: Path, name: str, *, rank: int = 16, base: str = "Qwen/Qwen3-0.6B") -> Path:
    """What `twin export` leaves: a GGUF, the PEFT adapter (config and weights) and the manifest."""
    d = tmp_path / name
    (d / "adapter").mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 32, "base_model_name_or_path": base}
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    # weights of their own per export: the LoRA name carries their fingerprint
    (d / "adapter" / "adapter_model.safetensors").write_bytes(str(d.resolve()).encode().ljust(64, b"\0"))
    write_gguf(d / "model-Q4_K_M.gguf")
    (d / "manifest.json").write_text(json.dumps({"base": base}))
    return d


def registry_of_versions(tmp_path: Path, *ranks: int) -> Path:
    """A registry with one version per rank, each promoted in turn (the last one serves)."""
    reg = tmp_path / "models"
    for i, rank in enumerate(ranks):
        version = register(reg, export_with_adapter(tmp_path, f"export{i}", rank=rank))
        promote(reg, version.name)
    return reg


def lora_name(reg: Path, version: str) -> str:
    """The model name vLLM serves `version` of `reg` under (`twin-<version>-<fingerprint>`)."""
    return lora_module_name(version, reg / version / "adapter")
