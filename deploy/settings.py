"""Settings of the retraining job, read from the same `.env` / environment as the bot."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import InputError


class RetrainSettings(BaseSettings):
    """`TWIN_MODEL`, `TWIN_DB`, `TWIN_DB_KEY` (shared with the bot) and the `TWIN_RETRAIN_*` knobs."""

    model_config = SettingsConfigDict(
        env_prefix="TWIN_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    model: Path = Field(Path("models"), description="the model registry directory (TWIN_MODEL)")
    db: Path = Field(Path("data/bot.db"), description="the bot's conversation store (TWIN_DB)")
    db_key: str | None = Field(None, repr=False, description="SQLCipher key of the store (TWIN_DB_KEY)")

    persona: str | None = Field(
        None, description="the name in the system prompt (TWIN_PERSONA), when no original dataset is set"
    )

    retrain_cron: str = Field("0 4 * * *", description="when the bot's scheduler runs a cycle")
    retrain_min_samples: int = Field(20, ge=1, description="fewer new samples than this: skip the cycle")
    retrain_replay_ratio: float = Field(
        1.0, ge=0, description="original-dataset samples replayed per new sample (catastrophic forgetting)"
    )
    retrain_dataset: Path | None = Field(
        None, description="the original dataset directory (train.jsonl, val.jsonl) for replay and the gate"
    )
    retrain_base_model: str | None = Field(
        None, description="base model the adapters apply to; default: the serving version's manifest"
    )
    retrain_heldout_ratio: float = Field(
        0.1, ge=0, lt=1, description="share of the newest new samples held out for the gate"
    )
    retrain_ppl_tolerance: float = Field(
        0.02, ge=0, description="candidate perplexity may exceed the serving one by this fraction"
    )
    retrain_style_tolerance: float = Field(
        0.1, ge=0, description="candidate style distance may exceed the serving one by this much"
    )
    retrain_max_steps: int = Field(200, ge=1, description="optimizer steps of one incremental run")
    retrain_learning_rate: float = Field(1e-4, gt=0)
    retrain_eval_samples: int = Field(64, ge=1, description="held-out prompts generated for style metrics")
    retrain_quants: str = Field("Q4_K_M", description="quantisations exported for the new version")
    retrain_keep: int = Field(5, ge=1, description="versions kept in the registry (current/previous always)")
    retrain_nice: int = Field(10, ge=0, le=19, description="niceness of the training child process")
    retrain_include_approved: bool = Field(
        True, description="include twin replies an operator approved (never unapproved ones)"
    )
    retrain_seed: int = 42

    @field_validator("retrain_dataset", "db_key", "retrain_base_model", "persona", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def quant_list(self) -> list[str]:
        return [q.strip() for q in self.retrain_quants.split(",") if q.strip()]


def load_settings(**overrides: object) -> RetrainSettings:
    """The settings from the environment and `.env`; a bad value is one InputError naming it."""
    try:
        return RetrainSettings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = "TWIN_" + "_".join(str(p) for p in error["loc"]).upper()
        raise InputError(".env / environment", f"{name}: {error['msg']}") from None
