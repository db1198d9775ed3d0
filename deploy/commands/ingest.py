"""`twin sample-db`, `twin decrypt`, `twin extract`, `twin android-key`: reading QQ NT databases."""

from __future__ import annotations

from pathlib import Path

import typer

KEY_HELP = "The database key (desktop: 16 characters read from QQ; see docs/ntqq.md). Never stored or logged."
# Reading the key from the environment keeps it out of shell history and `ps` listings.
KEY_ENV = "TWIN_QQ_KEY"
HMAC_HELP = "Force one HMAC variant (HMAC_SHA1, HMAC_SHA256, HMAC_SHA512); default: try them all."
ANDROID_UID_HELP = "Android: derive the key from the account uid (u_...) and the header's rand."
ANDROID_RAND_HELP = "Android: the rand value (default: read from the database header)."


def _resolve_key(db: Path, key: str | None, android_uid: str | None, android_rand: str | None) -> str | None:
    """--key, or the Android derivation md5(md5(uid) + rand)."""
    from pipeline.errors import InputError

    if android_uid is None:
        if android_rand is not None:
            raise InputError(db, "--android-rand needs --android-uid")
        return key
    if key is not None:
        raise InputError(db, "give either --key or --android-uid, not both")
    from pipeline.ntqq import keys

    return keys.android_key(android_uid, android_rand if android_rand is not None else keys.android_rand(db))


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `twin` app."""

    @app.command("sample-db")
    def sample_db(
        out: Path = typer.Option(..., "--out", "-o", help="Directory to write nt_msg.db into."),
        key: str = typer.Option(None, help="Key to encrypt with (default: the sample key, printed)."),
        messages: int = typer.Option(3000, min=1, help="Rows of synthetic history."),
        seed: int = typer.Option(0, help="Seed: the same seed gives the same database."),
        hmac: str = typer.Option("HMAC_SHA1", help="HMAC variant to write with."),
        wal: int = typer.Option(0, min=0, help="Leave the last N rows un-checkpointed in nt_msg.db-wal."),
    ) -> None:
        """Write a synthetic, format-faithful encrypted QQ NT database (DIR/nt_msg.db)."""
        from rich.console import Console

        from pipeline.errors import InputError
        from pipeline.ntqq.decrypt import HMAC_ALGORITHMS
        from pipeline.ntqq.sampledb import OWNER_NAME, OWNER_UIN, SAMPLE_KEY, write_sample_db

        if hmac.upper() not in HMAC_ALGORITHMS:
            raise InputError(
                out, f"unknown HMAC algorithm {hmac!r} (use one of {', '.join(HMAC_ALGORITHMS)})"
            )
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

    @app.command("decrypt")
    def decrypt(
        db: Path = typer.Argument(..., help="nt_msg.db (read only; never modified)."),
        out: Path = typer.Option(..., "--out", "-o", help="Plain SQLite file to write."),
        key: str = typer.Option(None, "--key", "-k", envvar=KEY_ENV, show_envvar=True, help=KEY_HELP),
        hmac: str = typer.Option(None, help=HMAC_HELP),
        android_uid: str = typer.Option(None, help=ANDROID_UID_HELP),
        android_rand: str = typer.Option(None, help=ANDROID_RAND_HELP),
    ) -> None:
        """Strip the QQ NT header, open the SQLCipher body and write a plain SQLite copy."""
        from rich.console import Console

        from pipeline.ntqq.decrypt import decrypt_db

        console = Console(stderr=True)
        with console.status("decrypting"):
            info = decrypt_db(db, _resolve_key(db, key, android_uid, android_rand), out, hmac=hmac)
        console.print(f"found: {info.describe()}")
        console.print(f"wrote [bold]{out}[/]")

    @app.command("extract")
    def extract(
        db: Path = typer.Argument(..., help="nt_msg.db, encrypted (with --key) or a plain copy."),
        out: Path = typer.Option(..., "--out", "-o", help="messages.jsonl to write."),
        key: str = typer.Option(None, "--key", "-k", envvar=KEY_ENV, show_envvar=True, help=KEY_HELP),
        chats: str = typer.Option("c2c,group", help="Which chats: c2c, group or c2c,group."),
        report: Path = typer.Option(None, help="Also write the summary as JSON here."),
        hmac: str = typer.Option(None, help=HMAC_HELP),
        android_uid: str = typer.Option(None, help=ANDROID_UID_HELP),
        android_rand: str = typer.Option(None, help=ANDROID_RAND_HELP),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Normalised messages (messages.jsonl) from a QQ NT database, with a summary."""
        from rich.console import Console

        from pipeline.errors import InputError
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

    @app.command("android-key")
    def android_key_command(
        uid: str = typer.Option(..., "--uid", help="The account's uid (u_...), see files/uid/ on the phone."),
        rand: str = typer.Option(None, "--rand", help="The header's rand value."),
        db: Path = typer.Option(None, "--db", help="Read rand from this database's header instead."),
    ) -> None:
        """Print the Android QQ NT database key, md5(md5(uid) + rand)."""
        from pipeline.errors import InputError
        from pipeline.ntqq.keys import android_key, android_rand

        if (rand is None) == (db is None):
            raise InputError(db or Path("-"), "give exactly one of --rand or --db")
        if not uid.strip():
            raise InputError(db or Path("-"), "empty --uid")
        typer.echo(android_key(uid, rand if rand is not None else android_rand(db)))
