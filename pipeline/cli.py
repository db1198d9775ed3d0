"""`twin sample-db`, `decrypt`, `extract`, `android-key` (QQ NT databases) and `build-dataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.dataset.settings import DatasetSettings
from pipeline.errors import InputError
from pipeline.settings_flags import Flag, settings_flags

commands = typer.Typer()

KEY_HELP = "The database key (desktop: 16 characters read from QQ; see docs/ntqq.md). Never stored or logged."
# Reading the key from the environment keeps it out of shell history and `ps` listings.
KEY_ENV = "TWIN_QQ_KEY"
HMAC_HELP = "Force one HMAC variant (HMAC_SHA1, HMAC_SHA256, HMAC_SHA512); default: try them all."
ANDROID_UID_HELP = "Android: derive the key from the account uid (u_...) and the header's rand."
ANDROID_RAND_HELP = "Android: the rand value (default: read from the database header)."

Key = Annotated[str | None, typer.Option("--key", "-k", envvar=KEY_ENV, show_envvar=True, help=KEY_HELP)]
Hmac = Annotated[str | None, typer.Option(help=HMAC_HELP)]
AndroidUid = Annotated[str | None, typer.Option(help=ANDROID_UID_HELP)]
AndroidRand = Annotated[str | None, typer.Option(help=ANDROID_RAND_HELP)]


def _resolve_key(db: Path, key: str | None, android_uid: str | None, android_rand: str | None) -> str | None:
    """--key, or the Android derivation md5(md5(uid) + rand)."""
    if android_uid is None:
        if android_rand is not None:
            raise InputError(db, "--android-rand needs --android-uid")
        return key
    if key is not None:
        raise InputError(db, "give either --key or --android-uid, not both")
    from pipeline.ntqq import keys

    return keys.android_key(android_uid, android_rand if android_rand is not None else keys.android_rand(db))


@commands.command("sample-db")
def sample_db(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write nt_msg.db into.")],
    key: Annotated[
        str | None, typer.Option(help="Key to encrypt with (default: the sample key, printed).")
    ] = None,
    messages: Annotated[int, typer.Option(min=1, help="Rows of synthetic history.")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same database.")] = 0,
    hmac: Annotated[str, typer.Option(help="HMAC variant to write with.")] = "HMAC_SHA1",
    wal: Annotated[
        int, typer.Option(min=0, help="Leave the last N rows un-checkpointed in nt_msg.db-wal.")
    ] = 0,
) -> None:
    """Write a synthetic, format-faithful encrypted QQ NT database (DIR/nt_msg.db)."""
    from rich.console import Console

    from pipeline.ntqq.decrypt import HMAC_ALGORITHMS
    from pipeline.ntqq.sampledb import OWNER_NAME, OWNER_UIN, SAMPLE_KEY, write_sample_db

    if hmac.upper() not in HMAC_ALGORITHMS:
        raise InputError(out, f"unknown HMAC algorithm {hmac!r} (use one of {', '.join(HMAC_ALGORITHMS)})")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    console = Console(stderr=True)
    with console.status(f"writing {messages:,} rows of synthetic history"):
        path = write_sample_db(
            out, key=key or SAMPLE_KEY, messages=messages, seed=seed, hmac=hmac.upper(), wal_messages=wal
        )
    console.print(f"wrote [bold]{path}[/] (owner {OWNER_NAME}, uin {OWNER_UIN})")
    if key is None:
        # The sample key is public (it is in the source); printing it is what makes the demo usable.
        console.print(f"sample key: {SAMPLE_KEY}")


@commands.command("decrypt")
def decrypt(
    db: Annotated[Path, typer.Argument(help="nt_msg.db (read only; never modified).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Plain SQLite file to write.")],
    key: Key = None,
    hmac: Hmac = None,
    android_uid: AndroidUid = None,
    android_rand: AndroidRand = None,
) -> None:
    """Strip the QQ NT header, open the SQLCipher body and write a plain SQLite copy."""
    from rich.console import Console

    from pipeline.ntqq.decrypt import decrypt_db

    console = Console(stderr=True)
    with console.status("decrypting"):
        info = decrypt_db(db, _resolve_key(db, key, android_uid, android_rand), out, hmac=hmac)
    console.print(f"found: {info.describe()}")
    console.print(f"wrote [bold]{out}[/]")


@commands.command("extract")
def extract(
    db: Annotated[Path, typer.Argument(help="nt_msg.db, encrypted (with --key) or a plain copy.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="messages.jsonl to write.")],
    key: Key = None,
    chats: Annotated[str, typer.Option(help="Which chats: c2c, group or c2c,group.")] = "c2c,group",
    report: Annotated[Path | None, typer.Option(help="Also write the summary as JSON here.")] = None,
    hmac: Hmac = None,
    android_uid: AndroidUid = None,
    android_rand: AndroidRand = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Normalised messages (messages.jsonl) from a QQ NT database, with a summary."""
    from rich.console import Console

    from pipeline.ntqq.decrypt import LAYOUT_DESCRIPTIONS
    from pipeline.ntqq.extract import extract_messages, parse_chats

    try:
        chat_types = parse_chats(chats)
    except ValueError as exc:
        raise InputError(db, str(exc)) from None
    result = extract_messages(
        db,
        out,
        key=_resolve_key(db, key, android_uid, android_rand),
        chats=chat_types,
        hmac=hmac,
        report=report,
        progress=progress,
    )
    console = Console(stderr=True)
    found = LAYOUT_DESCRIPTIONS[result.layout] + (f", {result.hmac}" if result.hmac else "")
    console.print(f"found: {found}" + (", with -wal" if result.wal else ""))
    for line in result.summary_lines():
        console.print(line)
    console.print(f"wrote [bold]{out}[/]" + (f" and {report}" if report else ""))


@commands.command("android-key")
def android_key(
    uid: Annotated[
        str, typer.Option("--uid", help="The account's uid (u_...), see files/uid/ on the phone.")
    ],
    rand: Annotated[str | None, typer.Option("--rand", help="The header's rand value.")] = None,
    db: Annotated[
        Path | None, typer.Option("--db", help="Read rand from this database's header instead.")
    ] = None,
) -> None:
    """Print the Android QQ NT database key, md5(md5(uid) + rand)."""
    from pipeline.ntqq import keys

    if (rand is None) == (db is None):
        raise InputError(db or Path("-"), "give exactly one of --rand or --db")
    if not uid.strip():
        raise InputError(db or Path("-"), "empty --uid")
    typer.echo(keys.android_key(uid, rand if rand is not None else keys.android_rand(db)))


@commands.command("build-dataset")
@settings_flags(
    DatasetSettings,
    "format",
    "session_gap",
    "burst_gap",
    "context_turns",
    "max_context_tokens",
    "persona",
    "examples",
    "examples_tokens",
    "no_reply_samples",
    "val_fraction",
    Flag("memory", "--memory/--no-memory"),
    "memory_tokens",
    Flag("mix", path=True),
    "mix_ratio",
    Flag("llm.enabled", "--llm-clean"),
    "llm.api_base",
    Flag("llm.api_key", envvar="TWIN_LLM_API_KEY"),
    "llm.model",
    "llm.concurrency",
    Flag("llm.optional", "--llm-optional"),
    Flag("llm.cache", path=True),
    "skip_bad",
    "seed",
)
def build_dataset_command(
    messages: Annotated[Path, typer.Argument(help="messages.jsonl written by `twin extract`")],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="output directory (created 0700, replaced atomically)")
    ],
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML/YAML settings (default: built-in rules.toml)")
    ] = None,
    overrides: dict[str, Any] | None = None,  # the DatasetSettings flags, given by @settings_flags
    redact_names: Annotated[
        Path | None, typer.Option("--redact-names", help="file of names to redact, one a line")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Sessions → turns → clean → redact → samples: train/val JSONL for SFT (LLaMA-Factory-ready)."""
    from rich.console import Console

    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.settings import DEFAULT_RULES_FILE

    overrides = overrides or {}
    format = overrides.get("format")
    if format is not None and format not in ("openai", "sharegpt", "alpaca"):
        raise InputError("--format", f"unknown format {format!r} (use openai, sharegpt or alpaca)")
    names = _read_names(redact_names) if redact_names is not None else None
    settings = DatasetSettings.from_file(config or DEFAULT_RULES_FILE, redact_names=names, **overrides)
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
