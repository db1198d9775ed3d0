"""`twin serve`, `simulate`, `health`, `napcat-config`, `retrain`, `demo` and `models`: running the
bot, checking it, connecting NapCat, the registry, retraining.

`serve` and `simulate` act on the bot from outside: one starts `bot.py` as its own process, the
other is a OneBot client (deploy/onebot_client.py). Neither imports the `bot` package, whose
`__init__` imports NoneBot, so `twin --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from deploy.napcat import COMPOSE_URL
from pipeline.errors import InputError

commands = typer.Typer()
models = typer.Typer(
    help="The model registry: without a command, list the versions with their eval numbers "
    "and which one serves; `promote V`; `rollback`; `samples` (each version's replies to held-out "
    "prompts); `vllm-args` (LoRA flags for vLLM)."
)
commands.add_typer(models, name="models")

REGISTRY_HELP = "model registry directory (default: TWIN_MODEL from the environment / .env)"
Registry = Annotated[Path | None, typer.Option("--registry", "-r", help=REGISTRY_HELP)]


def _registry(path: Path | None) -> Path:
    if path is not None:
        return path
    from deploy.settings import load_settings

    return Path(load_settings().twin_model)


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "—" if value is None or value == "" else str(value)


@models.callback(invoke_without_command=True)
def models_list(ctx: typer.Context, registry: Registry = None) -> None:
    """List versions with their eval numbers; the serving one is marked."""
    ctx.obj = registry
    if ctx.invoked_subcommand is None:
        _print_versions(_registry(registry))


@models.command("promote")
def models_promote(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="version to serve, e.g. v0003")],
    registry: Registry = None,
) -> None:
    """Serve VERSION (atomic switch of `current`; a running bot swaps to it)."""
    from pipeline.registry_ops import promote

    path = _registry(registry or ctx.obj)
    promote(path, version, reason="promoted by operator (twin models promote)")
    typer.echo(f"serving {version} (registry {path})")


@models.command("rollback")
def models_rollback(ctx: typer.Context, registry: Registry = None) -> None:
    """Serve the previously promoted version again."""
    from pipeline.registry import current_version
    from pipeline.registry_ops import rollback

    path = _registry(registry or ctx.obj)
    before = current_version(path)
    target = rollback(path, reason="rolled back by operator (twin models rollback)")
    typer.echo(f"rolled back {before} → {target.name} (registry {path})")


@models.command("samples")
def models_samples(
    ctx: typer.Context,
    registry: Registry = None,
    version: Annotated[
        list[str] | None, typer.Option("--version", help="only this version (repeatable); default: every one")
    ] = None,
    probes: Annotated[
        int, typer.Option("--probes", min=1, max=64, help="how many held-out prompts to pick when none are")
    ] = 8,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="pick the probes anew and answer them with every version again")
    ] = False,
    account: Annotated[
        int | None,
        typer.Option(help="with TWIN_ACCOUNTS: the QQ number whose account file's settings to use"),
    ] = None,
) -> None:
    """Answer the registry's held-out probes (picked once) with every version lacking samples."""
    from rich.progress import Progress

    from deploy.samples import fill_samples, llama_generate
    from deploy.settings import load_settings

    chosen = registry or ctx.obj
    settings = load_settings(account, **({"twin_model": str(chosen)} if chosen is not None else {}))
    path = Path(settings.twin_model)
    if not path.is_dir():
        raise InputError(path, "not a model registry directory (TWIN_MODEL or --registry)")
    with Progress(transient=True) as progress:
        task = progress.add_task("samples", total=None)

        def on_version(name: str) -> None:
            progress.update(task, description=f"samples: {name}")

        filled, failed = fill_samples(
            settings,
            path,
            llama_generate(settings),
            versions=version or None,
            count=probes,
            refresh=refresh,
            on_version=on_version,
        )
    if failed:
        problems = "; ".join(f"{name}: {why}" for name, why in failed.items())
        raise InputError(
            path, f"samples failed for {problems}" + (f" (filled {', '.join(filled)})" if filled else "")
        )
    typer.echo(f"samples: {', '.join(filled) or 'every version already has them'} (registry {path})")


@models.command("vllm-args")
def models_vllm_args(
    ctx: typer.Context,
    registry: Registry = None,
    all_versions: Annotated[
        bool, typer.Option("--all", help="every version, not only the serving one and its rollback target")
    ] = False,
    path_prefix: Annotated[
        str | None,
        typer.Option(help="where the registry directory is mounted inside vLLM's container, e.g. /models"),
    ] = None,
) -> None:
    """Print vLLM's LoRA flags for the registry: `vllm serve BASE $(twin models vllm-args)`."""
    from pipeline.registry import lora_modules, version_names, vllm_lora_args

    path = _registry(registry or ctx.obj)
    modules = lora_modules(path, version_names(path) if all_versions else None)
    if not modules:
        raise InputError(path, "no model versions to publish")
    args = vllm_lora_args(path, modules, path_prefix)
    base = next((m.base for m in modules if m.base), "")
    # stderr: stdout is only the flags, so that `$(…)` can splice them into a command line.
    typer.echo(f"base model: {base or 'not named in the manifests'} (the model `vllm serve` loads)", err=True)
    typer.echo(" ".join(args))


def _print_versions(registry: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.registry import current_version, list_versions, previous_version

    console = Console()
    versions = list_versions(registry)
    if not versions:
        console.print(f"no model versions in {registry} (register one with `twin retrain` or `twin export`)")
        return
    current, previous = current_version(registry), previous_version(registry)
    table = Table(
        title=f"model registry {registry}",
        caption="● serving (current), prev: what `twin models rollback` returns to; "
        "ppl: held-out perplexity, style: style distance",
    )
    table.add_column("", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("parent", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("samples", justify="right", no_wrap=True)
    table.add_column("ppl", justify="right", no_wrap=True)
    table.add_column("style", justify="right", no_wrap=True)
    table.add_column("quants", no_wrap=True)
    for v in reversed(versions):
        mark = "[bold green]●[/]" if v.name == current else ("prev" if v.name == previous else "")
        window = v.manifest.get("data_window") or {}
        table.add_row(
            mark,
            v.name,
            _fmt(v.parent),
            v.created[:16].replace("T", " ") or "—",
            _fmt(window.get("samples")),
            _fmt(v.eval.get("perplexity"), 2),
            _fmt(v.eval.get("style_distance")),
            ",".join(sorted((v.manifest.get("gguf") or {}).keys())) or "—",
        )
    console.print(table)


@commands.command("serve")
def serve() -> None:
    """Run the bot (the same as `python bot.py`); settings come from `.env` and the environment."""
    from deploy.onebot_client import BOT_PY

    if not BOT_PY.is_file():
        raise InputError(BOT_PY, "bot.py not found (run `twin serve` from a qq-twin checkout)")
    os.execv(sys.executable, [sys.executable, str(BOT_PY)])


@commands.command("simulate")
def simulate(
    url: Annotated[
        str | None,
        typer.Option(help="the bot's reverse WebSocket (default: ws://HOST:PORT/onebot/v11/ws)"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="ONEBOT_ACCESS_TOKEN",
            help="ONEBOT_ACCESS_TOKEN of the bot (default: .env, else the generated one)",
        ),
    ] = None,
    self_id: Annotated[int, typer.Option(help="the QQ number the bot plays (X-Self-ID)")] = 10000,
    user_id: Annotated[int, typer.Option(help="your QQ number in this simulated chat")] = 20000,
    group: Annotated[int | None, typer.Option(help="talk in this group instead of a private chat")] = None,
    card: Annotated[str, typer.Option(help="your group card (display name) in --group")] = "",
    wait: Annotated[float, typer.Option(help="seconds to wait for replies after each message")] = 60.0,
) -> None:
    """Chat with a running bot as a QQ friend (or group member), from the terminal; Ctrl-D ends."""
    import asyncio

    from rich.console import Console

    from deploy.onebot_client import OneBotClient, OneBotRefused

    # The bot's own sources and names (ONEBOT_V11_ACCESS_TOKEN too); an empty token means the
    # one it generated and keeps beside its store.
    settings = _bot_settings()
    if url is None:
        url = f"ws://{settings.get('host') or '127.0.0.1'}:{settings.get('port') or '8080'}/onebot/v11/ws"
    token = token or _access_token(settings)
    console = Console()

    async def run() -> None:
        async with OneBotClient(url, token=token, self_id=self_id) as client:
            where = f"group {group} as {card or user_id}" if group else f"private chat as {user_id}"
            console.print(f"[green]connected[/] to {url} — {where}; type a message, Ctrl-D to quit")
            while True:
                try:
                    line = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    return
                if not line.strip():
                    continue
                if group:
                    before = len(client.replies(group_id=group))
                    await client.send_group(group, user_id, line, card=card)
                else:
                    before = len(client.replies(user_id=user_id))
                    await client.send_private(user_id, line)
                await _print_replies(client, console, before, wait)

    async def _print_replies(client: OneBotClient, console: Console, before: int, wait: float) -> None:
        # Replies come as one or more bubbles; stop once the chat has been quiet for a moment.
        target = {"group_id": group} if group else {"user_id": user_id}
        try:
            got = await client.wait_reply(after=before, timeout=wait, **target)
        except TimeoutError:
            console.print("[dim](no reply)[/]")
            return
        shown = before
        while True:
            for message in got:
                console.print(f"[cyan]twin>[/] {message.text}")
            shown += len(got)
            try:
                got = await client.wait_reply(after=shown, timeout=3.0, **target)
            except TimeoutError:
                return

    try:
        asyncio.run(run())
    except OneBotRefused as exc:
        raise InputError(url, str(exc).removeprefix(f"{url}: ")) from None
    except KeyboardInterrupt:
        pass


def _bot_settings() -> dict[str, str | None]:
    """The settings as bot.py reads them: `.env`, `.env.{ENVIRONMENT}`, the environment (lower-case names)."""
    from bot import transport

    return transport.merge_layers(transport.settings_layers(os.environ))


def _access_token(settings: dict[str, str | None]) -> str | None:
    """ONEBOT_ACCESS_TOKEN as the bot uses it: the configured one, else the one it generated and kept."""
    from bot import transport

    return transport.configured_token(settings) or transport.kept_token(settings)


@commands.command("health")
def health(
    url: Annotated[
        str | None,
        typer.Option(help="the endpoint to ask (default: http://HOST:PORT/twin/health, or /twin/ready)"),
    ] = None,
    ready: Annotated[
        bool, typer.Option("--ready", help="ask /twin/ready (model, store, OneBot connection) with the token")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 5.0,
) -> None:
    """Exit 0 when the running bot is healthy (or ready, with --ready), 1 otherwise; one line of output."""
    from deploy.health import HEALTH_PATH, READY_PATH, local_url, probe

    settings = _bot_settings()
    if url is None:
        path = READY_PATH if ready else HEALTH_PATH
        url = local_url(settings.get("host") or "127.0.0.1", settings.get("port") or "8080", path)
    result = probe(url, token=_access_token(settings) if ready else None, timeout=timeout)
    typer.echo(result.line)
    if not result.healthy:
        raise typer.Exit(1)


@commands.command("napcat-config")
def napcat_config(
    uin: Annotated[
        str | None,
        typer.Option(
            envvar="NAPCAT_ACCOUNT",
            help="the QQ account NapCat logs into (default: NapCat's template for an account without one)",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="NapCat's config directory")] = Path(
        "napcat/config"
    ),
    url: Annotated[
        str, typer.Option(help="where NapCat dials the bot (compose: the `twin` service)")
    ] = COMPOSE_URL,
) -> None:
    """Write NapCat's onebot11 config: a reverse WebSocket to the bot with ONEBOT_ACCESS_TOKEN."""
    from bot.transport import GENERATE_HINT, MIN_EXPOSED_TOKEN_LENGTH
    from deploy.napcat import write_config

    token = _access_token(_bot_settings())
    if not token:
        raise InputError(".env", f"ONEBOT_ACCESS_TOKEN is empty: set one there first ({GENERATE_HINT})")
    if len(token) < MIN_EXPOSED_TOKEN_LENGTH:  # NapCat dials over a network: the bot would refuse it
        raise InputError(".env", f"ONEBOT_ACCESS_TOKEN is shorter than {MIN_EXPOSED_TOKEN_LENGTH} characters")
    path = write_config(out, uin or None, url, token)  # NAPCAT_ACCOUNT= (empty) means no account yet
    typer.echo(f"wrote {path}: NapCat dials {url} with ONEBOT_ACCESS_TOKEN (restart NapCat to apply)")


@commands.command("retrain")
def retrain(
    now: Annotated[
        bool, typer.Option("--now", help="run one cycle now: collect → train → gate → promote")
    ] = False,
    registry: Registry = None,
    print_settings: Annotated[
        bool,
        typer.Option(
            "--print-settings", help="print the TWIN_* settings as read here (JSON, secrets as ***)"
        ),
    ] = False,
    account: Annotated[
        int | None,
        typer.Option(help="with TWIN_ACCOUNTS: the QQ number whose account file's settings to use"),
    ] = None,
) -> None:
    """One incremental retrain cycle (with --now), else the last cycle's status and the schedule."""
    from deploy.settings import load_settings

    overrides = {"twin_model": str(registry)} if registry is not None else {}
    settings = load_settings(account, **overrides)
    if account is None and settings.twin_accounts and not print_settings:
        # The process-wide settings are no account's: retraining them could mix two accounts' data.
        raise InputError("TWIN_ACCOUNTS", "several accounts are set up: name one with --account <QQ number>")
    if print_settings:
        typer.echo(settings_json(settings))
        return
    if not now:
        _print_status(settings)
        return
    import signal

    from deploy.retrain import lower_priority, run_cycle

    # SIGTERM (the bot shutting down, systemd) unwinds like Ctrl-C: the cycle records it and
    # stops its training child instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The bot answers from the same cores: this whole cycle (evaluation and export too) yields.
    lower_priority(settings.twin_retrain_nice, idle=settings.twin_retrain_idle)
    result = run_cycle(settings, on_stage=lambda stage: typer.echo(f"retrain: {stage}…"))
    typer.echo(result.message)
    if result.state == "failed":
        raise typer.Exit(1)
    # promoted, rejected (by the gate), skipped (too little data), registered: exit 0


def settings_json(settings) -> str:
    """The settings as one JSON object of `TWIN_*` names, every secret value written as ***."""
    import json

    from bot.log_mask import MASK, is_secret_setting

    shown = {
        name.upper(): MASK if value and is_secret_setting(name) else value
        for name, value in settings.model_dump(mode="json").items()
    }
    return json.dumps(shown, ensure_ascii=False, sort_keys=True)


def _print_status(settings) -> None:
    from pipeline.registry import current_version, describe_status, retrain_status

    registry = Path(settings.twin_model)
    status = retrain_status(registry)
    typer.echo(f"registry {registry}: serving {current_version(registry) or 'nothing'}")
    typer.echo(f"schedule (TWIN_RETRAIN_CRON): {settings.twin_retrain_cron}")
    if not status:
        typer.echo("no retrain cycle has run yet; `twin retrain --now` runs one")
        return
    typer.echo(f"last cycle: {describe_status(status)}")  # the line `/twin status` shows


@commands.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where every artefact goes.")] = Path(
        "demo-output"
    ),
    messages: Annotated[int, typer.Option(help="Messages in the synthetic QQ history.")] = 3000,
    steps: Annotated[int, typer.Option(help="LoRA training steps.")] = 60,
    probes: Annotated[int, typer.Option(help="Held-out friend messages sent to the bot.")] = 16,
    threads: Annotated[int, typer.Option(help="CPU threads for llama.cpp generation.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed for the synthetic history and training.")] = 0,
) -> None:
    """Sample database → extract → dataset → LoRA → GGUF → bot answering a simulated QQ client."""
    from deploy.demo import DemoSettings, run_demo

    run_demo(
        DemoSettings(
            out_dir=out,
            messages=messages,
            seed=seed,
            train_steps=steps,
            probe_messages=probes,
            n_threads=threads,
        )
    )
