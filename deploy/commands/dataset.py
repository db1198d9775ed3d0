"""`twin build-dataset`: messages.jsonl → training samples (see docs/dataset.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import InputError


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `twin` app."""
    app.command("build-dataset")(build_dataset_command)


def build_dataset_command(
    messages: Path = typer.Argument(..., help="messages.jsonl written by `twin extract`"),
    out: Path = typer.Option(..., "-o", "--out", help="output directory (created 0700, replaced atomically)"),
    config: Path | None = typer.Option(
        None, "--config", help="TOML/YAML settings (default: built-in rules.toml)"
    ),
    format: str | None = typer.Option(None, "--format", help="openai | sharegpt | alpaca"),
    session_gap: int | None = typer.Option(
        None, "--session-gap", help="seconds of silence that end a conversation"
    ),
    burst_gap: int | None = typer.Option(
        None, "--burst-gap", help="seconds within which one sender's messages join"
    ),
    context_turns: int | None = typer.Option(
        None, "--context-turns", help="earlier turns carried per sample"
    ),
    max_context_tokens: int | None = typer.Option(
        None, "--max-context-tokens", help="token budget per sample"
    ),
    persona: str | None = typer.Option(None, "--persona", help="name in the system prompt"),
    no_reply_samples: float | None = typer.Option(
        None, "--no-reply-samples", help="rate of 'read, did not answer' samples (0..1)"
    ),
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help="latest share of conversations → val"
    ),
    mix: Path | None = typer.Option(
        None, "--mix", help="general instruction data (OpenAI/ShareGPT/Alpaca JSON[L])"
    ),
    mix_ratio: float | None = typer.Option(
        None, "--mix-ratio", help="share of train.jsonl that is mixed data"
    ),
    llm_clean: bool = typer.Option(
        False, "--llm-clean", help="judge samples with an OpenAI-compatible model"
    ),
    api_base: str | None = typer.Option(None, "--api-base", help="e.g. http://127.0.0.1:1234/v1"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TWIN_LLM_API_KEY", help="judge API key"),
    model: str | None = typer.Option(None, "--model", help="judge model name"),
    concurrency: int | None = typer.Option(None, "--concurrency", help="judge requests in flight"),
    llm_optional: bool = typer.Option(
        False, "--llm-optional", help="continue rule-only if the server is down"
    ),
    cache: Path | None = typer.Option(None, "--cache", help="LLM verdict cache (JSONL)"),
    redact_names: Path | None = typer.Option(
        None, "--redact-names", help="file of names to redact, one a line"
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip malformed input lines instead of failing"),
    seed: int | None = typer.Option(None, "--seed", help="seed for sampling and mixing"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Sessions → turns → clean → redact → samples: train/val JSONL for SFT (LLaMA-Factory-ready)."""
    from rich.console import Console

    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.settings import DEFAULT_RULES_FILE, DatasetSettings

    if format is not None and format not in ("openai", "sharegpt", "alpaca"):
        raise InputError("--format", f"unknown format {format!r} (use openai, sharegpt or alpaca)")
    names = _read_names(redact_names) if redact_names is not None else None
    llm = {
        "enabled": True if llm_clean else None,
        "api_base": api_base,
        "api_key": api_key,
        "model": model,
        "concurrency": concurrency,
        "optional": True if llm_optional else None,
        "cache": str(cache) if cache is not None else None,
    }
    settings = DatasetSettings.from_file(
        config or DEFAULT_RULES_FILE,
        format=format,
        session_gap=session_gap,
        burst_gap=burst_gap,
        context_turns=context_turns,
        max_context_tokens=max_context_tokens,
        persona=persona,
        no_reply_samples=no_reply_samples,
        val_fraction=val_fraction,
        mix=str(mix) if mix is not None else None,
        mix_ratio=mix_ratio,
        redact_names=names,
        skip_bad=True if skip_bad else None,
        seed=seed,
        llm=llm,
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


def _read_names(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "no such names file") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise InputError(path, "expected a UTF-8 text file with one name a line") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
