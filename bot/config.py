"""Every `TWIN_*` setting, in one pydantic model: the bot, `twin retrain` and the retrain child.

The plugin reads it with `get_plugin_config(Config)`; the CLI and the retrain child (which
inherits the bot's environment and working directory) read the same `.env` / environment with
`load_config()`, without NoneBot. `.env.example` documents every field; lists are JSON
(`TWIN_PRIVATE_DENY=[10001, 10002]`). With `TWIN_ACCOUNTS`, each account's settings are its
own file laid over those (`load_accounts`; docs/bot.md#several-accounts).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from pipeline.chatformat import BURST_GAP, DEFAULT_PERSONA
from pipeline.errors import InputError

# The model registry that `twin export` and `twin retrain` write and the bot follows.
DEFAULT_MODEL = "models"
DEFAULT_DB = "data/bot.db"


class Config(BaseModel):
    """qq-twin settings (`TWIN_*`)."""

    # how the QQ side reaches the bot (bot/transport.py)
    twin_onebot_http_post: bool = Field(
        False, description="also serve OneBot HTTP POST (/onebot/v11/, /onebot/v11/http); needs ONEBOT_SECRET"
    )

    # the operator console in the browser (bot/console/, docs/console.md); one per process
    twin_console: bool = Field(
        False, description="serve the operator console at /twin/console/ (needs a password)"
    )
    twin_console_password: str = Field(
        "", description="the console's operator password (12+ characters; not the OneBot token)"
    )
    twin_console_session_hours: float = Field(
        12.0, gt=0.0, le=720.0, description="a console login lasts this long (hours), idle or not"
    )

    # how it logs (bot.py)
    twin_log_format: Literal["text", "json"] = Field(
        "text", description="`text` lines, or `json`: one object per line (time, level, name, message)"
    )

    # what answers
    twin_model: str = Field(
        DEFAULT_MODEL, description="a .gguf file, a model directory, or the registry (with `current`)"
    )
    twin_backend: Literal["llama_cpp", "openai"] = Field(
        "llama_cpp", description="`llama_cpp` in-process, or `openai` (any OpenAI-compatible server)"
    )
    twin_n_threads: int = Field(2, ge=1, description="llama.cpp threads (more than the free cores is slower)")
    twin_n_ctx: int = Field(
        2048,
        ge=256,
        description="context window, tokens: llama.cpp loads with it; openai prompts stay within it too",
    )
    twin_max_tokens: int = Field(96, ge=1, description="longest reply, tokens")
    twin_temperature: float = Field(0.7, ge=0.0, description="sampling temperature (0 = greedy)")
    twin_top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling")
    twin_repeat_penalty: float = Field(
        1.1, ge=1.0, le=2.0, description="penalise repeated tokens (1 = off); small models loop without it"
    )
    twin_seed: int = Field(-1, description="fixed seed for reproducible replies; -1 = random")
    twin_openai_base_url: str = Field("http://127.0.0.1:8000/v1", description="openai backend: server URL")
    twin_openai_model: str = Field("twin", description="openai backend: served model name (shown as version)")
    twin_openai_api_key: str = Field("EMPTY", description="openai backend: API key")
    twin_openai_timeout: float = Field(60.0, gt=0.0, description="openai backend: seconds per request")
    twin_openai_retries: int = Field(2, ge=0, description="openai backend: retries after timeouts / 5xx")
    twin_openai_fallback_urls: list[str] | str = Field(
        [],
        description="openai backend: further server URLs (comma list or JSON), tried in order when "
        "the one serving fails (connection, timeout, 5xx) after its retries",
    )
    twin_openai_lora: bool = Field(
        False,
        description="openai backend: ask for model `twin-<version>-<fingerprint>` of the registry's "
        "serving version (vLLM with one LoRA per version, docs/serving.md) and follow promotions "
        "and rollbacks",
    )
    twin_vllm_runtime_lora: bool = Field(
        False,
        description="with TWIN_OPENAI_LORA: load a newly promoted version's adapter into every server "
        "(vLLM /v1/load_lora_adapter) before serving it",
    )
    twin_model_poll: float = Field(
        10.0, gt=0.0, description="seconds between looks at the registry's `current`"
    )
    twin_fallback_reply: str = Field("", description="said when the backend fails; empty = silence")
    twin_special_tokens: list[str] = Field(
        [], description="special-token text removed from chat text and replies, beyond the common families"
    )

    # who it is
    twin_persona: str = Field(
        DEFAULT_PERSONA, description="the owner's name in the system prompt (as in the dataset)"
    )
    twin_burst_gap: int = Field(
        BURST_GAP, ge=0, description="seconds within which one sender's messages join (dataset burst_gap)"
    )

    # several QQ accounts in one process (docs/bot.md#several-accounts)
    twin_accounts: list[Path] = Field(
        [], description="one settings file per QQ account (JSON list); empty = one account, these settings"
    )
    twin_account: int = Field(
        0, ge=0, description="the QQ number (self_id) these settings serve; 0 = whichever connects"
    )
    twin_superusers: list[int] = Field(
        [], description="who may give this account /twin commands; empty = SUPERUSERS"
    )
    twin_nicknames: list[str] = Field(
        [],
        description="the names friends call this account by: a group message that contains one "
        "addresses its twin; empty = NICKNAME (set it per account file when there are several)",
    )

    # the conversation store
    twin_db: Path = Field(Path(DEFAULT_DB), description="conversation store (SQLite, WAL)")
    twin_db_key: str = Field("", description="non-empty: encrypt the store with SQLCipher under this key")
    twin_db_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite durability: FULL syncs every message to disk (docs/benchmarks.md)"
    )

    # when it speaks
    twin_private_allow: list[int] = Field([], description="private chats answered; empty = every friend")
    twin_private_deny: list[int] = Field([], description="private chats never answered")
    twin_group_allow: list[int] = Field([], description="groups it may speak in; empty = every group")
    twin_group_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="chance to join a group chat unprompted (`/twin prob`)"
    )
    twin_ignore_users: list[int] = Field([], description="other bots: stored as context, never answered")
    twin_burst_window: float = Field(1.5, ge=0.0, description="quiet seconds that end a burst")
    twin_takeover_minutes: float = Field(
        10.0,
        ge=0.0,
        description="minutes the twin stays quiet in a chat after you write there yourself; 0 = never",
    )

    # memory
    twin_memory_turns: int = Field(16, ge=1, description="stored messages of the chat fed back as context")
    twin_memory_window: int = Field(3600, ge=0, description="seconds of memory; 0 = no age limit")
    twin_memory: bool = Field(
        False,
        description="give each chat's prompt that chat's memory (names, facts, topics); "
        "match the dataset's `memory` setting",
    )
    twin_memory_tokens: int = Field(
        160, ge=16, description="most tokens of a chat's memory in its prompt (dataset memory_tokens)"
    )
    twin_memory_extractor: Literal["rules", "backend"] = Field(
        "rules", description="how a chat's memory is refreshed: `rules` (extractive) or `backend` (the model)"
    )
    twin_session_gap: int = Field(
        3600, gt=0, description="seconds of silence that close a chat's conversation (dataset session_gap)"
    )

    # the owner's own past replies to similar messages, in the prompt (docs/bot.md, examples)
    twin_examples: int = Field(
        0,
        ge=0,
        le=20,
        description="how many of the owner's past replies to similar messages go in the prompt; 0 = off",
    )
    twin_examples_tokens: int = Field(
        120, ge=8, description="estimated tokens of those replies, at most (the dataset's examples_tokens)"
    )
    twin_examples_other_chats: bool = Field(
        False,
        description="also take them from other chats (the owner's words only, never a friend's); "
        "off: a chat's examples come from that chat alone",
    )
    twin_examples_messages: Path | None = Field(
        None, description="an imported messages.jsonl whose replies are looked up too, besides the store"
    )

    # pacing and limits (counted in bubbles actually sent: what QQ's risk control sees)
    twin_max_bubbles: int = Field(4, ge=1, description="most bubbles one reply splits into")
    twin_typing_delay: float = Field(0.6, ge=0.0, description="seconds before each bubble")
    twin_typing_per_char: float = Field(0.12, ge=0.0, description="plus this many seconds per character")
    twin_typing_max: float = Field(6.0, ge=0.0, description="longest typing delay, seconds")
    twin_typing_jitter: float = Field(
        0.3, ge=0.0, le=1.0, description="typing delays vary by up to this share either way (0 = exact)"
    )
    twin_rate_per_chat: int = Field(12, ge=1, description="sends per chat in any minute")
    twin_rate_per_sender: int = Field(8, ge=1, description="sends answering one person in any minute")
    twin_rate_total: int = Field(20, ge=1, description="sends per minute over all chats")
    twin_sender_hourly_cap: int = Field(60, ge=0, description="sends answering one person per hour; 0 = none")
    twin_sender_daily_cap: int = Field(150, ge=0, description="sends answering one person per day; 0 = none")
    twin_daily_cap: int = Field(500, ge=0, description="sends per day over all chats; 0 = no cap")
    twin_send_failure_limit: int = Field(
        5, ge=1, description="failed sends in a row after which the twin stops sending until /twin resume"
    )
    twin_send_backoff: float = Field(
        30.0, gt=0.0, description="seconds of silence after a failed send, doubling with each further one"
    )
    twin_answer_strangers: bool = Field(False, description="answer private messages from non-friends")
    twin_answer_group_temp: bool = Field(False, description="answer temporary chats started from a group")
    twin_block_links: bool = Field(True, description="drop bubbles carrying links (QQ penalises them)")
    twin_blocked_words: list[str] = Field([], description="drop bubbles containing any of these")
    twin_stickers: Literal["owner", "any", "off"] = Field(
        "owner",
        description="which market stickers a `[名字]` in a reply goes out as, in a bubble of its own: "
        "`owner` (those you sent), `any` (also friends'; yours win), `off` (none); unknown ones are dropped",
    )

    # prompt bounds (a 30,000-character paste must not silence a chat)
    twin_max_turn_chars: int = Field(
        600, ge=16, description="longest turn in a prompt, characters; longer ones keep their end"
    )

    # retraining (bot/retrain.py starts `twin retrain --now`; deploy/retrain.py runs the cycle)
    twin_retrain_cron: str = Field("0 4 * * *", description="crontab of scheduled retrains; empty disables")
    twin_retrain_nice: int = Field(
        10, ge=0, le=19, description="niceness of the retrain child process and of its training child"
    )
    twin_retrain_idle: bool = Field(
        True,
        description="Linux: retraining uses only CPU time nothing else wants (SCHED_IDLE); false: nice only",
    )
    twin_retrain_threads: int = Field(
        0,
        ge=0,
        description="torch threads of retraining; 0 = the cores TWIN_N_THREADS leaves free (at least 1)",
    )
    twin_retrain_min_samples: int = Field(20, ge=1, description="fewer new samples than this: skip the cycle")
    twin_retrain_replay_ratio: float = Field(
        1.0, ge=0, description="original-dataset samples replayed per new sample (catastrophic forgetting)"
    )
    twin_retrain_dataset: Path | None = Field(
        None, description="the original dataset directory (train.jsonl, val.jsonl) for replay and the gate"
    )
    twin_retrain_base_model: str | None = Field(
        None, description="base model the adapters apply to; default: the serving version's manifest"
    )
    twin_retrain_heldout_ratio: float = Field(
        0.1, ge=0, lt=1, description="share of the newest new samples held out for the gate"
    )
    twin_retrain_ppl_tolerance: float = Field(
        0.02, ge=0, description="candidate perplexity may exceed the serving one by this fraction"
    )
    twin_retrain_style_tolerance: float = Field(
        0.1, ge=0, description="candidate style distance may exceed the serving one by this much"
    )
    twin_retrain_max_steps: int = Field(200, ge=1, description="optimizer steps of one incremental run")
    twin_retrain_learning_rate: float = Field(1e-4, gt=0, description="learning rate of one incremental run")
    twin_retrain_eval_samples: int = Field(
        64, ge=1, description="held-out prompts generated for style metrics"
    )
    twin_retrain_quants: str = Field("Q4_K_M", description="quantisations exported for the new version")
    twin_retrain_keep: int = Field(
        5, ge=1, description="versions kept in the registry (current/previous always)"
    )
    twin_retrain_include_approved: bool = Field(
        True, description="include twin replies an operator approved (never unapproved ones)"
    )
    twin_retrain_seed: int = Field(42, description="seed of data shuffling, training and evaluation")

    @field_validator("twin_retrain_cron")
    @classmethod
    def _valid_crontab(cls, value: str) -> str:
        if value.strip():
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger.from_crontab(value)  # raises ValueError naming the bad field
        return value.strip()

    @field_validator(
        "twin_retrain_dataset", "twin_retrain_base_model", "twin_examples_messages", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("twin_openai_fallback_urls", mode="before")
    @classmethod
    def _url_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)  # a JSON error becomes the field's validation error
            return [url.strip() for url in text.split(",") if url.strip()]
        return value

    @field_validator("twin_openai_fallback_urls")
    @classmethod
    def _http_urls(cls, value: list[str] | str) -> list[str]:
        urls = [value] if isinstance(value, str) else value
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"not an http(s) URL: {url.split('@')[-1]!r}")
        return urls

    @property
    def openai_urls(self) -> list[str]:
        """The servers of the openai backend in the order they are tried."""
        return [self.twin_openai_base_url, *self.twin_openai_fallback_urls]

    @property
    def retrain_quant_list(self) -> list[str]:
        return [q.strip() for q in self.twin_retrain_quants.split(",") if q.strip()]


class _EnvConfig(BaseSettings, Config):
    """`Config` read by pydantic-settings: field `twin_model` is `TWIN_MODEL` in any case."""

    model_config = SettingsConfigDict(env_file_encoding="utf-8", extra="ignore")


def env_files(environ: Mapping[str, str] = os.environ, cwd: Path = Path()) -> tuple[Path, Path]:
    """The files NoneBot reads settings from, lowest priority first: `.env`, `.env.{ENVIRONMENT}`."""
    base = cwd / ".env"
    named = {name.lower(): value for name, value in environ.items()}
    in_file = {name.lower(): value for name, value in dotenv_values(base, encoding="utf-8").items()}
    environment = named.get("environment") or in_file.get("environment") or "prod"
    return base, cwd / f".env.{environment}"


def load_config(cwd: Path = Path(), env_file: Path | None = None, **overrides: object) -> Config:
    """The settings as the bot sees them (the environment over the `.env` files), without NoneBot;
    `env_file` replaces `cwd`'s `.env` files. Raises pydantic's ValidationError naming the bad field."""
    files = (env_file,) if env_file is not None else env_files(os.environ, cwd)
    return _EnvConfig(_env_file=files, **overrides)


# ------------------------------------------------------------------------- several accounts

# What one process shares, so an account file may not set it.
PROCESS_WIDE = (
    "twin_accounts",
    "twin_onebot_http_post",
    "twin_console",
    "twin_console_password",
    "twin_console_session_hours",
)


def _account_layer(file: Path) -> dict[str, object]:
    """An account file's settings, decoded as the environment's are (lists are JSON)."""
    if not file.is_file():
        raise InputError(file, "no such file" if not file.exists() else "not a regular file")
    try:
        names = dotenv_values(file, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(file, f"cannot read it ({type(exc).__name__})") from None
    for name, value in names.items():
        field = name.lower()
        if field not in Config.model_fields:
            raise InputError(file, f"{name} is not a TWIN_* setting (only those belong in an account file)")
        if field in PROCESS_WIDE:
            raise InputError(file, f"{name.upper()} is for the whole process: set it in .env, not here")
        if value is None:
            raise InputError(file, f"{name} has no value (write {name.upper()}=…)")
    try:
        return DotEnvSettingsSource(_EnvConfig, env_file=file, env_file_encoding="utf-8")()
    except SettingsError as exc:  # a list or a flag that is not JSON
        named = re.search(r'field "(\w+)"', str(exc))
        raise InputError(file, f"{named[1].upper() if named else 'a setting'}: not valid JSON") from None


def load_account_config(file: Path, cwd: Path = Path(), **overrides: object) -> Config:
    """One account's settings: its file over the environment over the `.env` files.

    Raises InputError naming the file and the bad setting."""
    layer = _account_layer(file)
    try:
        config = load_config(cwd, **{**layer, **overrides})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = "_".join(str(p) for p in error["loc"]).upper()
        where = file if name.lower() in layer else ".env / environment"
        raise InputError(where, f"{name}: {error['msg']}") from None
    if not config.twin_account:
        raise InputError(file, "TWIN_ACCOUNT is not set: name the QQ number this file's settings serve")
    return config


def load_accounts(settings: Config, cwd: Path = Path()) -> dict[Path, Config]:
    """Every account's settings by file, in `TWIN_ACCOUNTS` order; refuses two files for one QQ
    number or one store (InputError naming the second file)."""
    accounts: dict[Path, Config] = {}
    seen_account: dict[int, Path] = {}
    seen_db: dict[Path, Path] = {}
    for name in settings.twin_accounts:
        file = cwd / name
        config = load_account_config(file, cwd)
        first = seen_account.setdefault(config.twin_account, file)
        if first != file or file in accounts:
            raise InputError(file, f"TWIN_ACCOUNT {config.twin_account} is already served by {first}")
        db = (cwd / config.twin_db).resolve()
        first = seen_db.setdefault(db, file)
        if first != file:
            raise InputError(file, f"TWIN_DB {config.twin_db} is {first}'s too: each account needs its own")
        accounts[file] = config
    return accounts


def account_settings(settings: Config, account: int, cwd: Path = Path(), **overrides: object) -> Config:
    """The settings of the account `TWIN_ACCOUNTS` lists for QQ number `account` (`twin retrain
    --account`, the bot's retrain child)."""
    for file, config in load_accounts(settings, cwd).items():
        if config.twin_account == account:
            return load_account_config(file, cwd, **overrides) if overrides else config
    raise InputError("TWIN_ACCOUNTS", f"no account file has TWIN_ACCOUNT={account}")


def settings_table() -> str:
    """Every plugin setting as the Markdown table of docs/bot.md (generated: this class is its one home)."""
    rows = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for name, field in Config.model_fields.items():
        default = field.default
        if default in ("", None):
            shown = "(none)"
        elif isinstance(default, (bool, list)):
            shown = f"`{json.dumps(default, ensure_ascii=False)}`"
        else:
            shown = f"`{default}`"
        rows.append(f"| `{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m bot.config > the table for docs/bot.md
    print(settings_table())
