"""Training settings: one typed object, loadable from YAML/TOML, overridable by flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_BASE_MODEL = "Qwen/Qwen3-8B"
SETTINGS_FILE = "settings.json"
# A finished run directory holds these two (written last, so their presence means "complete").
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"

MoeScope = Literal["expert_only", "router_only", "all"]
LossOn = Literal["all", "final"]


class TrainSettings(BaseModel):
    """Everything `twin train` needs; stored resolved in `RUN_DIR/settings.json`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The descriptions are the `twin train` flags' help.
    data: Path = Field(description="dataset directory (train.jsonl, val.jsonl)")
    output_dir: Path = Field(description="run directory")  # checkpoints, adapter/, metrics.json
    base_model: str = Field(
        DEFAULT_BASE_MODEL,  # `smollm2` is the offline demo base
        description=f"hub id, model dir, .gguf file or `smollm2` (default {DEFAULT_BASE_MODEL})",
    )
    gguf_file: str | None = Field(None, description="GGUF file inside --base-model")

    # data
    max_seq_len: int = Field(384, ge=16, description="tokens per sample (longer samples are cut)")
    # Packed rows keep samples apart: attention never crosses samples.
    pack: bool = Field(True, description="sequence packing (default on)")
    # `final`: a reply that also appears as context in later samples is learned once.
    loss_on: LossOn = Field(
        "all", description="all: learn every owner reply of a sample (default); final: only the last"
    )
    batch_size: int = Field(4, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")

    # schedule
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0

    # LoRA
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    qlora: bool = Field(False, description="4-bit NF4 base (CUDA only)")  # with double quantisation
    # A PEFT adapter directory; it keeps its own rank and targets.
    init_adapter: Path | None = Field(
        None, description="continue this LoRA adapter instead of starting a fresh one"
    )
    moe_lora_scope: MoeScope = Field("all", description="expert_only|router_only|all")
    expert_patterns: list[str] = Field(
        default_factory=lambda: [r"\.experts\.(\d+)\.", r"\.block_sparse_moe\.experts\.(\d+)\."],
        description="regexes whose first group is an expert index",
    )
    router_patterns: list[str] = Field(default_factory=lambda: [r"\.gate$", r"\.router$", r"\.router\.\w+$"])
    max_experts: int | None = Field(None, ge=1, description="adapt experts 0..N-1 only")

    # runtime
    gradient_checkpointing: bool = False
    bf16: bool | None = Field(None, description="bf16 weights and autocast; default: on CUDA only")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")  # default: torch's choice
    save_every: int = Field(25, ge=1, description="checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(1, ge=1)

    @field_validator("base_model")
    @classmethod
    def _base_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("base_model is empty")
        return value.strip()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, indent=2)


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML (`.yaml`/`.yml`) or TOML (`.toml`) settings file → a dict; a `[train]` table is unwrapped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(path, f"cannot read config file ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise InputError(path, "config file must be .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise InputError(
            path, f"not valid {path.suffix.lstrip('.').upper()}: {exc}".splitlines()[0]
        ) from None
    if not isinstance(data, dict):
        raise InputError(path, "config file must hold a mapping of settings")
    if isinstance(data.get("train"), dict):
        data = data["train"]
    return data


def load_settings(config: Path | None = None, **overrides: Any) -> TrainSettings:
    """Settings from an optional config file, with non-None keyword overrides (CLI flags) on top."""
    values: dict[str, Any] = read_config_file(config) if config else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainSettings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        raise InputError(config or "settings", f"{where}: {error['msg']}") from None
