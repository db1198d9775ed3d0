"""MoE LoRA scopes on a tiny random Qwen3-MoE: dry-run listings and a real training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.cli import main as twin
from trainer.config import TrainSettings
from trainer.moe import dry_run_targets
from trainer.tiny import cached_tiny_model, fixture_cache_dir
from trainer.train import train


@pytest.fixture(scope="module")
def tiny_moe(request, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    tokenizer_dir = cached_tiny_model(fixture_cache_dir(request))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    )
    directory = tmp_path_factory.mktemp("tiny-moe")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def settings(tiny_moe: Path, tmp_path: Path, **extra) -> TrainSettings:
    return TrainSettings(
        base_model=str(tiny_moe), data=tmp_path / "data", output_dir=tmp_path / "run", **extra
    )


def test_expert_only_adapts_the_fused_expert_tensors_and_nothing_else(tiny_moe, tmp_path):
    names = dry_run_targets(settings(tiny_moe, tmp_path, moe_lora_scope="expert_only"))

    assert names == [
        f"model.layers.{i}.mlp.experts.{w}  (parameter)"
        for i in (0, 1)
        for w in ("gate_up_proj", "down_proj")
    ]


def test_router_only_adapts_the_routers(tiny_moe, tmp_path):
    names = dry_run_targets(settings(tiny_moe, tmp_path, moe_lora_scope="router_only"))

    assert names == [
        "model.layers.0.mlp.gate.weight  (parameter)",
        "model.layers.1.mlp.gate.weight  (parameter)",
    ]


def test_all_adds_attention_projections(tiny_moe, tmp_path):
    names = dry_run_targets(settings(tiny_moe, tmp_path, moe_lora_scope="all"))

    assert "model.layers.0.self_attn.q_proj" in names
    assert "model.layers.1.mlp.experts.down_proj  (parameter)" in names
    assert not any("lm_head" in n for n in names)


def test_a_dry_run_shows_the_expert_cap_on_fused_tensors(tiny_moe, tmp_path):
    names = dry_run_targets(settings(tiny_moe, tmp_path, moe_lora_scope="expert_only", max_experts=2))

    assert names == [
        f"model.layers.{i}.mlp.experts.{w}  (parameter, experts 0-1 of 4)"
        for i in (0, 1)
        for w in ("gate_up_proj", "down_proj")
    ]


def test_a_cap_at_or_above_the_expert_count_caps_nothing(tiny_moe, tmp_path):
    capped = dry_run_targets(settings(tiny_moe, tmp_path, moe_lora_scope="expert_only", max_experts=4))

    assert capped == dry_run_targets(settings(tiny_moe, tmp_path, moe_lora_scope="expert_only"))


def test_dry_run_prints_the_modules_and_writes_nothing(tiny_moe, tmp_path, capsys):
    args = ["train", "--data", str(tmp_path), "-o", str(tmp_path / "run"), "--base-model", str(tiny_moe)]
    assert twin([*args, "--moe-lora-scope", "router_only", "--dry-run"]) == 0

    out = capsys.readouterr().out
    assert "model.layers.1.mlp.gate.weight" in out and "2 modules would get LoRA adapters" in out
    assert not (tmp_path / "run").exists()


def test_an_expert_only_run_trains_and_saves_expert_adapters(tiny_moe, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sample = {"messages": [{"role": "user", "content": "在吗"}, {"role": "assistant", "content": "在的"}]}
    (data / "train.jsonl").write_text(json.dumps(sample, ensure_ascii=False) + "\n", encoding="utf-8")

    train(settings(tiny_moe, tmp_path, moe_lora_scope="expert_only", max_steps=2, threads=1), progress=False)

    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and all(".mlp.experts." in k for k in keys)


def test_an_expert_cap_trains_only_the_first_experts_of_each_fused_tensor(tiny_moe, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    chats = [
        ("在吗", "在的，刚下班"),
        ("明天吃火锅？", "哈哈哈好啊，明天见"),
        ("他去不去", "我也不知道，问问他吧"),
    ]
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in chats
    ]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # A large learning rate, so that the experts under the cap clearly move in three steps.
    extra = {"max_steps": 3, "threads": 1, "lr": 0.05}
    capped = settings(tiny_moe, tmp_path, moe_lora_scope="expert_only", max_experts=2, **extra)
    train(capped, progress=False)

    deltas = expert_deltas(tmp_path / "run" / "adapter", rank=capped.lora_r, experts=4)
    assert len(deltas) == 4  # gate_up_proj and down_proj in both layers
    for name, per_expert in deltas.items():
        assert all(d.abs().max() > 0 for d in per_expert[:2]), name
        assert all(d.abs().max() == 0 for d in per_expert[2:]), name


def expert_deltas(adapter: Path, *, rank: int, experts: int) -> dict[str, list]:
    """Each fused tensor's per-expert LoRA delta B_e·A_e, unpacked as peft's ParamWrapper packs it."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    deltas = {}
    for key, lora_a in weights.items():
        if ".lora_A." not in key:
            continue
        lora_b = weights[key.replace(".lora_A.", ".lora_B.")]
        a = lora_a.reshape(experts, rank, -1)  # expert e owns rows e*r .. (e+1)*r-1
        b = lora_b.reshape(lora_b.shape[0], rank, experts)  # expert e owns columns c with c % E == e
        deltas[key] = [b[:, :, e] @ a[e] for e in range(experts)]
    return deltas
