"""The plugin's settings: one pydantic model, read with `get_plugin_config(Config)`.

Every field is a `TWIN_*` environment variable (or `.env` line); `.env.example` documents
them all. Lists are JSON (`TWIN_PRIVATE_DENY=[10001, 10002]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class Config(BaseModel):
    """qq-twin plugin settings (`TWIN_*`)."""

    # what answers
    twin_model: str = ""  # a .gguf file, a model directory, or a registry (models/ with `current`)
    twin_backend: Literal["llama_cpp", "openai"] = "llama_cpp"
    twin_n_threads: int = Field(2, ge=1)  # llama.cpp threads; more than the free cores collapses
    twin_n_ctx: int = Field(2048, ge=256)
    twin_max_tokens: int = Field(96, ge=1)
    twin_temperature: float = Field(0.7, ge=0.0)
    twin_top_p: float = Field(0.9, gt=0.0, le=1.0)
    twin_seed: int = -1  # -1: random; fixed seeds make replies reproducible
    twin_openai_base_url: str = "http://127.0.0.1:8000/v1"
    twin_openai_model: str = "twin"
    twin_openai_api_key: str = "EMPTY"
    twin_openai_timeout: float = Field(60.0, gt=0.0)
    twin_openai_retries: int = Field(2, ge=0)
    twin_model_poll: float = Field(10.0, gt=0.0)  # seconds between looks at registry `current`
    twin_fallback_reply: str = ""  # said when the backend fails; empty = stay silent

    # who it is
    twin_persona: str = "我"  # the name in the system prompt; must match the training data

    # the conversation store
    twin_db: Path = Path("data/bot.db")
    twin_db_key: str = ""  # non-empty: encrypt the store with SQLCipher

    # when it speaks
    twin_private_allow: list[int] = []  # empty: every friend
    twin_private_deny: list[int] = []
    twin_group_allow: list[int] = []  # empty: every group; else only these groups
    twin_group_probability: float = Field(0.0, ge=0.0, le=1.0)  # chance to join unprompted
    twin_ignore_users: list[int] = []  # other bots: stored as context, never answered
    twin_burst_window: float = Field(1.5, ge=0.0)  # quiet seconds that end a burst

    # memory
    twin_memory_turns: int = Field(16, ge=1)  # stored messages fed back as context
    twin_memory_window: int = Field(3600, ge=0)  # seconds; older messages are forgotten

    # pacing and limits
    twin_max_bubbles: int = Field(4, ge=1)
    twin_typing_delay: float = Field(0.6, ge=0.0)  # seconds before each bubble
    twin_typing_per_char: float = Field(0.12, ge=0.0)  # plus this per character
    twin_typing_max: float = Field(6.0, ge=0.0)
    twin_rate_per_chat: int = Field(6, ge=1)  # replies per chat per minute
    twin_rate_total: int = Field(30, ge=1)  # replies per minute over all chats
    twin_daily_cap: int = Field(500, ge=0)  # replies per day; 0 = no cap
    twin_block_links: bool = True  # drop bubbles carrying links (QQ penalises them)
    twin_blocked_words: list[str] = []  # drop bubbles containing any of these

    # retraining
    twin_retrain_cron: str = "0 4 * * *"  # crontab; empty disables the schedule
    twin_retrain_nice: int = Field(10, ge=0, le=19)  # niceness of the retrain child process
