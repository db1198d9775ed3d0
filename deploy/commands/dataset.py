"""`twin build-dataset`: messages.jsonl → training samples (see docs/dataset.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.errors import InputError


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `twin` app."""
    app.command("build-dataset")(build_dataset_command)


# Flags that override a DatasetSettings field: parameter name → field ("llm." for the [llm] table).
# An unset flag (None, or a switch left off) keeps the config file's value.
_SETTING_OF_FLAG = {
    "format": "format",
    "session_gap": "session_gap",
    "burst_gap": "burst_gap",
    "context_turns": "context_turns",
    "max_context_tokens": "max_context_tokens",
    "persona": "persona",
    "no_reply_samples": "no_reply_samples",
    "val_fraction": "val_fraction",
    "mix": "mix",
    "mix_ratio": "mix_ratio",
    "skip_bad": "skip_bad",
    "seed": "seed",
    "llm_clean": "llm.enabled",
    "api_base": "llm.api_base",
    "api_key": "llm.api_key",
    "model": "llm.model",
    "concurrency": "llm.concurrency",
    "llm_optional": "llm.optional",
    "cache": "llm.cache",
}


def _setting(flag: str, help: str, **kwargs: Any) -> Any:
    """An option that, when given, overrides the config file's value."""
    return typer.Option(None, flag, help=help, **kwargs)


def _switch(flag: str, help: str) -> Any:
    """An on/off option; off keeps the config file's value."""
    return typer.Option(False, flag, help=help)


def build_dataset_command(
    ctx: typer.Context,
    messages: Path = typer.Argument(..., help="messages.jsonl written by `twin extract`"),
    out: Path = typer.Option(..., "-o", "--out", help="output directory (created 0700, replaced atomically)"),
    config: Path | None = _setting("--config", "TOML/YAML settings (default: built-in rules.toml)"),
    format: str | None = _setting("--format", "openai | sharegpt | alpaca"),
    session_gap: int | None = _setting("--session-gap", "seconds of silence that end a conversation"),
    burst_gap: int | None = _setting("--burst-gap", "seconds within which one sender's messages join"),
    context_turns: int | None = _setting("--context-turns", "earlier turns carried per sample"),
    max_context_tokens: int | None = _setting("--max-context-tokens", "token budget per sample"),
    persona: str | None = _setting("--persona", "name in the system prompt"),
    no_reply_samples: float | None = _setting(
        "--no-reply-samples", "rate of 'read, did not answer' samples (0..1)"
    ),
    val_fraction: float | None = _setting("--val-fraction", "latest share of conversations → val"),
    mix: Path | None = _setting("--mix", "general instruction data (OpenAI/ShareGPT/Alpaca JSON[L])"),
    mix_ratio: float | None = _setting("--mix-ratio", "share of train.jsonl that is mixed data"),
    llm_clean: bool = _switch("--llm-clean", "judge samples with an OpenAI-compatible model"),
    api_base: str | None = _setting("--api-base", "e.g. http://127.0.0.1:1234/v1"),
    api_key: str | None = _setting("--api-key", "judge API key", envvar="TWIN_LLM_API_KEY"),
    model: str | None = _setting("--model", "judge model name"),
    concurrency: int | None = _setting("--concurrency", "judge requests in flight"),
    llm_optional: bool = _switch("--llm-optional", "continue rule-only if the server is down"),
    cache: Path | None = _setting("--cache", "LLM verdict cache (JSONL)"),
    redact_names: Path | None = _setting("--redact-names", "file of names to redact, one a line"),
    skip_bad: bool = _switch("--skip-bad", "skip malformed input lines instead of failing"),
    seed: int | None = _setting("--seed", "seed for sampling and mixing"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Sessions → turns → clean → redact → samples: train/val JSONL for SFT (LLaMA-Factory-ready)."""
    from rich.console import Console

    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.settings import DEFAULT_RULES_FILE, DatasetSettings

    if format is not None and format not in ("openai", "sharegpt", "alpaca"):
        raise InputError("--format", f"unknown format {format!r} (use openai, sharegpt or alpaca)")
    names = _read_names(redact_names) if redact_names is not None else None
    settings = DatasetSettings.from_file(
        config or DEFAULT_RULES_FILE, redact_names=names, **_overrides(ctx.params)
    )
    report = build_dataset(messages, out, settings, progress=not quiet)

    console = Console(soft_wrap=True)
    s = report.samples
    console.print(
        f"[bold green]dataset[/] {out}: {s['train']} train + {s['val']} val samples"
        + (f" (+{s['mix']} mixed)" if s["mix"] else "")
        + f", {report.owner_share:.0%} of the owner's {report.owner_messages} messages used"
    )
    if report.bad_lines:
        console.print(f"[yellow]skipped {len(report.bad_lines)} malformed lines[/] (see report.json)")
    if report.dropped:
        console.print("dropped by rule: " + ", ".join(f"{k} {v}" for k, v in report.dropped.items()))
    if report.redactions:
        console.print("redacted: " + ", ".join(f"{k} {v}" for k, v in report.redactions.items()))
    llm_state = report.llm
    if llm_state.get("skipped_because"):
        console.print(f"[yellow]LLM pass skipped:[/] {llm_state['skipped_because']}")
    elif llm_state.get("enabled"):
        console.print(
            f"LLM pass: {llm_state['judged']} judged, {llm_state['cached']} from cache, "
            f"{llm_state['dropped']} dropped, {llm_state['errors']} unjudged"
        )


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The settings the flags override, nested as DatasetSettings.from_file takes them."""
    overrides: dict[str, Any] = {"llm": {}}
    for name, setting in _SETTING_OF_FLAG.items():
        value = flags[name]
        if value is False:  # a switch left off
            value = None
        elif isinstance(value, Path):
            value = str(value)
        table, _, key = setting.rpartition(".")
        (overrides[table] if table else overrides)[key] = value
    return overrides


def _read_names(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "no such names file") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise InputError(path, "expected a UTF-8 text file with one name a line") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
