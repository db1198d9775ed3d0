"""Every knob of `build-dataset` in one typed object, loadable from a TOML or YAML file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.chatformat import BURST_GAP, DEFAULT_PERSONA
from pipeline.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_RULES_FILE = Path(__file__).with_name("rules.toml")

Format = Literal["openai", "sharegpt", "alpaca"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuleSettings(_Strict):
    """The rule-based cleaning pass; each rule is counted in the report."""

    placeholder_only_owner: bool = True
    placeholder_only_others: bool = False
    keep_owner_stickers: bool = True
    drop_forwards_and_cards: bool = True
    max_message_chars: int = Field(400, ge=1)
    drop_link_only: bool = True
    max_repeats: int = Field(2, ge=1)
    command_prefixes: list[str] = Field(default_factory=lambda: ["/", "!", "！", "#", "."])
    bot_senders: list[str] = Field(default_factory=list)


class LLMSettings(_Strict):
    """The optional LLM judging pass against any OpenAI-compatible server."""

    enabled: bool = Field(False, description="judge samples with an OpenAI-compatible model")
    api_base: str = Field("http://127.0.0.1:8000/v1", description="e.g. http://127.0.0.1:1234/v1")
    api_key: str = Field("EMPTY", repr=False, description="judge API key")
    model: str = Field("qwen3", description="judge model name")
    concurrency: int = Field(8, ge=1, le=256, description="judge requests in flight")
    max_attempts: int = Field(4, ge=1)
    backoff_s: float = Field(0.5, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    min_score: int = Field(2, ge=1, le=5)
    optional: bool = Field(False, description="continue rule-only if the server is down")
    # "" → llm-clean-cache.jsonl beside the output directory
    cache: str = Field("", description="LLM verdict cache (JSONL)")


class DatasetSettings(_Strict):
    """All settings of `twin build-dataset`; defaults are those of `rules.toml`."""

    session_gap: int = Field(3600, gt=0, description="seconds of silence that end a conversation")
    burst_gap: int = Field(BURST_GAP, ge=0, description="seconds within which one sender's messages join")
    max_conversation_messages: int = Field(2000, ge=2)
    context_turns: int = Field(8, ge=0, description="earlier turns carried per sample")
    max_context_tokens: int = Field(1024, ge=16, description="token budget per sample")
    no_reply_samples: float = Field(
        0.0, ge=0, le=1, description="rate of 'read, did not answer' samples (0..1)"
    )
    persona: str = Field(DEFAULT_PERSONA, description="name in the system prompt")
    examples: int = Field(
        0, ge=0, le=20, description="owner's past replies to similar messages in each system prompt (0 = off)"
    )
    examples_tokens: int = Field(120, ge=8, description="estimated tokens of those examples, at most")
    format: Format = Field("openai", description="openai | sharegpt | alpaca")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="latest share of conversations → val")
    seed: int = Field(0, description="seed for sampling and mixing")
    mix: str = Field("", description="general instruction data (OpenAI/ShareGPT/Alpaca JSON[L])")
    mix_ratio: float = Field(0.0, ge=0, lt=1, description="share of train.jsonl that is mixed data")
    memory: bool = Field(
        False,
        description="put each chat's memory (names, facts, topics said before) in its samples' system prompt",
    )
    memory_tokens: int = Field(160, ge=16, description="most tokens of a chat's memory per sample")
    redact_names: list[str] = Field(default_factory=list)
    skip_bad: bool = Field(False, description="skip malformed input lines instead of failing")
    rules: RuleSettings = Field(default_factory=RuleSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> DatasetSettings:
        """Load a TOML or YAML settings file, then apply `overrides` (None values are ignored).

        Nested keys are given as `rules={...}` / `llm={...}` and merge into the file's tables.
        """
        path = Path(path)
        data = _read_mapping(path)
        try:
            cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(path, f"bad settings: {_first_error(exc)}") from None
        try:
            return cls.model_validate(_merge(data, overrides))
        except ValidationError as exc:
            # The file alone was fine, so a flag is to blame: name it as the user typed it.
            err = exc.errors()[0]
            flag = "--" + str(err["loc"][-1] if err["loc"] else "option").replace("_", "-")
            raise InputError(flag, f"bad value ({err['msg']})") from None

    def with_overrides(self, **overrides: Any) -> DatasetSettings:
        """A copy with `overrides` applied (None values ignored, nested tables merged)."""
        merged = _merge(self.model_dump(), overrides)
        return type(self).model_validate(merged)

    def public_dict(self) -> dict[str, Any]:
        """The settings as recorded in report.json: everything but the API key."""
        data = self.model_dump()
        data["llm"].pop("api_key", None)
        return data


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such settings file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a .toml or .yaml settings file") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw.decode("utf-8")) or {}
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except Exception as exc:  # tomllib/yaml/unicode errors all mean "not a settings file"
        raise InputError(path, f"not a valid settings file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "settings file must hold a table of keys")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursively; None in `extra` means "not given"."""
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            continue
        if isinstance(value, dict):
            inner = out.get(key)
            out[key] = _merge(inner if isinstance(inner, dict) else {}, value)
        else:
            out[key] = value
    return out


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}"
