"""`twin train`, `twin eval`, `twin export`, `twin chat`: thin shells over `trainer`."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _progress(quiet: bool) -> bool:
    """Whether to show progress; `--quiet` also hushes transformers' own bars (weight loading)."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return not quiet


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `twin` app."""
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("export")(export_command)
    app.command("chat")(chat_command)


def train_command(
    data: Path | None = typer.Option(None, "--data", help="dataset directory (train.jsonl, val.jsonl)"),
    output: Path | None = typer.Option(None, "-o", "--output", help="run directory"),
    base_model: str | None = typer.Option(
        None, "--base-model", help="hub id, model dir, .gguf file or `smollm2` (default Qwen/Qwen3-8B)"
    ),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="GGUF file inside --base-model"),
    config: Path | None = typer.Option(None, "--config", help="YAML/TOML settings; flags override it"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    epochs: float | None = typer.Option(None, "--epochs"),
    lr: float | None = typer.Option(None, "--lr"),
    lora_r: int | None = typer.Option(None, "--lora-r"),
    lora_alpha: int | None = typer.Option(None, "--lora-alpha"),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    grad_accum: int | None = typer.Option(None, "--grad-accum"),
    qlora: bool | None = typer.Option(None, "--qlora/--no-qlora", help="4-bit NF4 base (CUDA only)"),
    init_adapter: Path | None = typer.Option(
        None, "--init-adapter", help="continue this LoRA adapter instead of starting a fresh one"
    ),
    pack: bool | None = typer.Option(None, "--pack/--no-pack", help="sequence packing (default on)"),
    loss_on: str | None = typer.Option(
        None, "--loss-on", help="all: learn every owner reply of a sample (default); final: only the last"
    ),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing"
    ),
    seed: int | None = typer.Option(None, "--seed"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads"),
    moe_lora_scope: str | None = typer.Option(None, "--moe-lora-scope", help="expert_only|router_only|all"),
    max_experts: int | None = typer.Option(None, "--max-experts", help="adapt experts 0..N-1 only"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the modules that would get LoRA, then stop"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """LoRA / QLoRA fine-tuning on the owner's replies; re-run to resume after a kill."""
    from trainer.config import load_settings

    settings = load_settings(
        config,
        data=data,
        output_dir=output,
        base_model=base_model,
        gguf_file=gguf_file,
        max_steps=max_steps,
        epochs=epochs,
        lr=lr,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        qlora=qlora,
        init_adapter=init_adapter,
        pack=pack,
        loss_on=loss_on,
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
        threads=threads,
        moe_lora_scope=moe_lora_scope,
        max_experts=max_experts,
    )
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


def eval_command(
    run_dir: Path = typer.Argument(..., help="a finished `twin train` run directory"),
    data: Path = typer.Option(..., "--data", help="dataset directory (uses val.jsonl)"),
    max_samples: int = typer.Option(64, "--max-samples", help="held-out conversations to score"),
    seed: int = typer.Option(0, "--seed"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Base vs twin: held-out assistant-token perplexity and style metrics (eval.json, eval.md, eval.png)."""
    from pipeline.files import disk_full_is_input_error
    from trainer.evaluate import evaluate

    with disk_full_is_input_error(run_dir, "eval.json, eval.md and eval.png were not (all) written"):
        report = evaluate(run_dir, data, max_samples=max_samples, seed=seed, progress=_progress(quiet))
    console.print(report.markdown())


def export_command(
    run_dir: Path = typer.Argument(..., help="a finished `twin train` run directory"),
    output: Path = typer.Option(..., "-o", "--output", help="model directory to create"),
    quant: str = typer.Option("Q8_0", "--quant", help="comma-separated llama.cpp types, e.g. Q8_0,Q4_K_M"),
    lora_gguf: bool = typer.Option(False, "--lora-gguf", help="also write the adapter alone as GGUF"),
    persona: str | None = typer.Option(None, "--persona", help="system prompt persona (default: as trained)"),
    threads: int = typer.Option(2, "--threads"),
    keep_merged: bool = typer.Option(False, "--keep-merged", help="keep the merged HF model (merged/)"),
    quiet: bool = typer.Option(False, "--quiet"),
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


def chat_command(
    model: Path = typer.Argument(..., help="a .gguf file, a model directory or a registry (models/)"),
    persona: str | None = typer.Option(None, "--persona", help="default: the model's manifest"),
    threads: int = typer.Option(2, "--threads", help="llama.cpp threads"),
    max_tokens: int = typer.Option(96, "--max-tokens"),
    temperature: float = typer.Option(0.7, "--temperature"),
    quant: str | None = typer.Option(None, "--quant", help="which GGUF of a model directory"),
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
