"""`twin demo`: the whole path, offline, on CPU."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add `twin demo` to the app."""

    @app.command()
    def demo(
        out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="Where every artefact goes."),
        messages: int = typer.Option(3000, help="Messages in the synthetic QQ history."),
        steps: int = typer.Option(60, help="LoRA training steps."),
        probes: int = typer.Option(16, help="Held-out friend messages sent to the bot."),
        threads: int = typer.Option(2, help="CPU threads for llama.cpp generation."),
        seed: int = typer.Option(0, help="Seed for the synthetic history and training."),
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
