"""LoRA on mixture-of-experts bases: which modules get adapters, shown without loading weights."""

from __future__ import annotations

from typing import Any

from trainer.config import TrainSettings
from trainer.models import lora_targets, resolve_base


def skeleton_model(settings: TrainSettings) -> Any:
    """The base model's module tree on the meta device: names and shapes, no weights, no RAM."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    base = resolve_base(settings.base_model, settings.gguf_file)
    kwargs = {"gguf_file": base.gguf_file} if base.gguf_file else {}
    config = AutoConfig.from_pretrained(base.source, **kwargs)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def dry_run_targets(settings: TrainSettings) -> list[str]:
    """Full names of the modules (and fused expert/router tensors) `twin train` would adapt."""
    return lora_targets(skeleton_model(settings), settings).listing()
