"""`twin models [promote V | rollback]` and `twin retrain [--now]`: the registry and the retrain job."""

from __future__ import annotations

from pathlib import Path

import typer

REGISTRY_HELP = "model registry directory (default: TWIN_MODEL from the environment / .env)"


def _registry(path: Path | None) -> Path:
    if path is not None:
        return path
    from deploy.settings import load_settings

    return load_settings().model


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "—" if value is None or value == "" else str(value)


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


def register(app: typer.Typer) -> None:
    """Add `twin models` and `twin retrain` to the `twin` app."""
    models = typer.Typer(
        help="The model registry: without a command, list the versions with their eval numbers "
        "and which one serves; `promote V`; `rollback`."
    )

    @models.callback(invoke_without_command=True)
    def models_list(
        ctx: typer.Context,
        registry: Path | None = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP),
    ) -> None:
        """List versions with their eval numbers; the serving one is marked."""
        ctx.obj = registry
        if ctx.invoked_subcommand is None:
            _print_versions(_registry(registry))

    @models.command("promote")
    def models_promote(
        ctx: typer.Context,
        version: str = typer.Argument(..., help="version to serve, e.g. v0003"),
        registry: Path | None = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP),
    ) -> None:
        """Serve VERSION (atomic switch of `current`; a running bot swaps to it)."""
        from pipeline.registry_ops import promote

        path = _registry(registry or ctx.obj)
        promote(path, version, reason="promoted by operator (twin models promote)")
        typer.echo(f"serving {version} (registry {path})")

    @models.command("rollback")
    def models_rollback(
        ctx: typer.Context,
        registry: Path | None = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP),
    ) -> None:
        """Serve the previously promoted version again."""
        from pipeline.registry import current_version
        from pipeline.registry_ops import rollback

        path = _registry(registry or ctx.obj)
        before = current_version(path)
        target = rollback(path, reason="rolled back by operator (twin models rollback)")
        typer.echo(f"rolled back {before} → {target.name} (registry {path})")

    app.add_typer(models, name="models")

    @app.command("retrain")
    def retrain_command(
        now: bool = typer.Option(False, "--now", help="run one cycle now: collect → train → gate → promote"),
        registry: Path | None = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP),
    ) -> None:
        """One incremental retrain cycle (with --now), else the last cycle's status and the schedule."""
        from deploy.settings import load_settings

        overrides = {"model": registry} if registry is not None else {}
        settings = load_settings(**overrides)
        if not now:
            _print_status(settings)
            return
        import signal
        import sys

        from deploy.retrain import lower_priority, run_cycle

        # SIGTERM (the bot shutting down, systemd) unwinds like Ctrl-C: the cycle records it and
        # stops its training child instead of leaving it orphaned.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        # The bot answers from the same cores: this whole cycle (evaluation and export too) yields.
        lower_priority(settings.retrain_nice)
        result = run_cycle(settings, on_stage=lambda stage: typer.echo(f"retrain: {stage}…"))
        typer.echo(result.message)
        if result.state == "failed":
            raise typer.Exit(1)
        # promoted, rejected (by the gate), skipped (too little data), registered: exit 0


def _print_status(settings) -> None:
    from pipeline.registry import current_version, describe_status, retrain_status

    status = retrain_status(settings.model)
    typer.echo(f"registry {settings.model}: serving {current_version(settings.model) or 'nothing'}")
    typer.echo(f"schedule (TWIN_RETRAIN_CRON): {settings.retrain_cron}")
    if not status:
        typer.echo("no retrain cycle has run yet; `twin retrain --now` runs one")
        return
    typer.echo(f"last cycle: {describe_status(status)}")  # the line `/twin status` shows
