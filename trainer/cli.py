"""`twin train`, `twin eval`, `twin export`, `twin chat`: thin shells over `trainer`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.settings_flags import Flag, settings_flags
from trainer.config import TrainSettings

commands = typer.Typer()
console = Console()

RunDir = Annotated[Path, typer.Argument(help="a finished `twin train` run directory")]
Quiet = Annotated[bool, typer.Option("--quiet")]


def _progress(quiet: bool) -> bool:
    """Whether to show progress; `--quiet` also hushes transformers' own bars (weight loading)."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return not quiet


@commands.command("train")
@settings_flags(
    TrainSettings,
    "data",
    Flag("output_dir", "--output", short="-o"),
    "base_model",
    "gguf_file",
    "max_steps",
    "epochs",
    "lr",
    "lora_r",
    "lora_alpha",
    "max_seq_len",
    "batch_size",
    "grad_accum",
    Flag("qlora", "--qlora/--no-qlora"),
    "init_adapter",
    Flag("pack", "--pack/--no-pack"),
    "loss_on",
    Flag("gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing"),
    "seed",
    "threads",
    "moe_lora_scope",
    "max_experts",
)
def train_command(
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML/TOML settings; flags override it")
    ] = None,
    overrides: dict[str, Any] | None = None,  # the TrainSettings flags, given by @settings_flags
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list the modules that would get LoRA, then stop")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """LoRA / QLoRA fine-tuning on the owner's replies; re-run to resume after a kill."""
    from trainer.config import load_settings

    settings = load_settings(config, **(overrides or {}))
    if dry_run:
        from trainer.moe import dry_run_targets

        names = dry_run_targets(settings)
        for name in names:
            console.print(name, highlight=False)
        console.print(f"[bold]{len(names)}[/] modules would get LoRA adapters")
        return
    from pipeline.files import disk_full_is_input_error
    from trainer.train import train

    unfinished = "the run is not finished; free some space and re-run the same command to resume"
    with disk_full_is_input_error(settings.output_dir, unfinished):
        result = train(settings, progress=_progress(quiet))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, rank 0 reports
        return
    table = Table(title=f"run {result.run_dir}", show_header=False)
    for key in ("steps", "train_tokens", "label_tokens", "train_runtime_s", "tokens_per_s", "final_loss"):
        table.add_row(key, str(getattr(result, key)))
    table.add_row("peak_rss_mb", str(result.peak_rss_mb))
    table.add_row("adapter", str(result.adapter_dir))
    console.print(table)


@commands.command("eval")
def eval_command(
    run_dir: RunDir,
    data: Annotated[Path, typer.Option("--data", help="dataset directory (uses val.jsonl)")],
    max_samples: Annotated[int, typer.Option("--max-samples", help="held-out conversations to score")] = 64,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    quiet: Quiet = False,
) -> None:
    """Base vs twin: held-out assistant-token perplexity and style metrics (eval.json, eval.md, eval.png)."""
    from pipeline.files import disk_full_is_input_error
    from trainer.evaluate import evaluate

    with disk_full_is_input_error(run_dir, "eval.json, eval.md and eval.png were not (all) written"):
        report = evaluate(run_dir, data, max_samples=max_samples, seed=seed, progress=_progress(quiet))
    console.print(report.markdown())


@commands.command("export")
def export_command(
    run_dir: RunDir,
    output: Annotated[Path, typer.Option("-o", "--output", help="model directory to create")],
    quant: Annotated[
        str, typer.Option("--quant", help="comma-separated llama.cpp types, e.g. Q8_0,Q4_K_M")
    ] = "Q8_0",
    lora_gguf: Annotated[
        bool, typer.Option("--lora-gguf", help="also write the adapter alone as GGUF")
    ] = False,
    persona: Annotated[
        str | None, typer.Option("--persona", help="system prompt persona (default: as trained)")
    ] = None,
    threads: Annotated[int, typer.Option("--threads")] = 2,
    keep_merged: Annotated[
        bool, typer.Option("--keep-merged", help="keep the merged HF model (merged/)")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Merge, convert with llama.cpp's converter, quantise, verify; writes manifest.json and Modelfile."""
    from trainer.export import export

    result = export(
        run_dir,
        output,
        quants=[q for q in quant.split(",") if q.strip()],
        lora_gguf=lora_gguf,
        progress=_progress(quiet),
        persona=persona,
        n_threads=threads,
        keep_merged=keep_merged,
    )
    table = Table(title=f"model {result.model_dir} ({result.seconds:.1f} s)")
    table.add_column("file")
    table.add_column("MiB", justify="right")
    for name, size in result.sizes.items():
        table.add_row(name, f"{size / 2**20:.1f}")
    console.print(table)


@commands.command("chat")
def chat_command(
    model: Annotated[Path, typer.Argument(help="a .gguf file, a model directory or a registry (models/)")],
    persona: Annotated[str | None, typer.Option("--persona", help="default: the model's manifest")] = None,
    threads: Annotated[int, typer.Option("--threads", help="llama.cpp threads")] = 2,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 96,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.7,
    quant: Annotated[str | None, typer.Option("--quant", help="which GGUF of a model directory")] = None,
) -> None:
    """Talk to a model in the terminal with the prompt the bot uses (empty line or Ctrl-D quits)."""
    from pipeline.chatformat import DEFAULT_PERSONA, Turn, split_bubbles, system_prompt
    from trainer.chat import ChatModel, resolve_chat_model

    gguf, manifest = resolve_chat_model(model, quant)
    system = system_prompt(persona) if persona else manifest.get("system_prompt") or None
    with console.status(f"loading {gguf.name}"):
        chat = ChatModel(
            gguf,
            system=system,
            persona=persona or DEFAULT_PERSONA,
            n_threads=threads,
            max_tokens=max_tokens,
            temperature=temperature,
        )
    history: list[Turn] = []
    console.print(f"[dim]{gguf} · empty line to quit[/]")
    with chat:
        while True:
            try:
                text = console.input("[bold cyan]you>[/] ")
            except EOFError:
                break
            if not text.strip():
                break
            history.append(Turn(role="user", text=text))
            reply = chat.generate(chat.messages(history))
            history.append(Turn(role="assistant", text=reply))
            for bubble in split_bubbles(reply) or ["(no reply)"]:
                console.print(f"[bold green]twin>[/] {bubble}", highlight=False)
