"""What a chat's context in the prompt is worth: held-out perplexity and style distance, variant by variant.

One run, one generated history and one base model (the demo's: `deploy/demo.py`'s synthetic QQ
database and SmolLM2-135M-Instruct, trained with the demo's settings, same seed, same steps).
Each variant is the demo's dataset settings plus a few overrides (`PARTS`; `memory+examples` is
both); each is built, trained and evaluated on its own held-out set (the same conversations, its
own system prompts), and the rows go side by side into docs/benchmarks.md.

    .venv/bin/python bench/context_ablation.py [--variants none,examples] [--write-docs]
    .venv/bin/python bench/context_ablation.py --quick   # a tiny random model, a few steps: a smoke test
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._docs import replace_section
from deploy.demo import DemoSettings
from pipeline.dataset.settings import DatasetSettings
from pipeline.errors import InputError

HEADING = "## Context in the prompt: examples and memory (`bench/context_ablation.py`)"

# Each part of a variant is a set of DatasetSettings overrides; `a+b` applies both.
PARTS: dict[str, dict[str, Any]] = {
    "none": {},
    # Three short replies fit beside SmolLM2's 112-token system prompt within MAX_SEQ_LEN.
    "examples": {"examples": 3, "examples_tokens": 60},
    "memory": {"memory": True},  # issue 15's per-friend memory (DatasetSettings.memory)
}
# Longer than the demo's 256 so that the examples fit without cutting replies off; every
# variant trains and is evaluated at this length (and this sample budget, ~max_seq_len / 1.9).
MAX_SEQ_LEN = 384
MAX_CONTEXT_TOKENS = 200
DEMO = DemoSettings()


@dataclass(slots=True)
class Row:
    variant: str
    train_samples: int
    val_samples: int
    base_perplexity: float
    twin_perplexity: float
    base_style: float
    twin_style: float
    seconds: float


def variant_settings(name: str, base: DatasetSettings) -> DatasetSettings:
    """`base` with the overrides of every part of `name`; InputError naming an unknown part or setting."""
    overrides: dict[str, Any] = {}
    for part in name.split("+"):
        if part not in PARTS:
            raise InputError("--variants", f"unknown part {part!r} in {name!r} (known: {', '.join(PARTS)})")
        for key, value in PARTS[part].items():
            if key not in DatasetSettings.model_fields:
                raise InputError(
                    "--variants", f"{name!r} needs dataset setting {key!r}, which this build lacks"
                )
            overrides[key] = value
    try:
        return base.with_overrides(**overrides)
    except ValueError as exc:
        raise InputError("--variants", f"{name!r}: bad override ({str(exc).splitlines()[0]})") from None


def demo_dataset_settings(demo: DemoSettings) -> DatasetSettings:
    """The demo's dataset settings, with the sample budget of MAX_SEQ_LEN."""
    return DatasetSettings(
        persona=demo.persona,
        seed=demo.seed,
        context_turns=demo.context_turns,
        max_context_tokens=MAX_CONTEXT_TOKENS,
    )


def run(args: argparse.Namespace, work: Path, chosen: dict[str, DatasetSettings]) -> list[Row]:
    from pipeline.dataset.build import build_dataset
    from pipeline.ntqq import sampledb
    from pipeline.ntqq.extract import extract_messages
    from trainer.config import TrainSettings
    from trainer.evaluate import evaluate
    from trainer.train import train

    demo = DemoSettings(messages=args.messages, seed=args.seed, train_steps=args.steps)
    database = sampledb.write_sample_db(
        work / "qq", key=sampledb.SAMPLE_KEY, messages=demo.messages, seed=demo.seed
    )
    messages = work / "messages.jsonl"
    extract_messages(database, messages, key=sampledb.SAMPLE_KEY)
    model = args.base_model
    rows = []
    for name, settings in chosen.items():
        started = time.perf_counter()
        data = work / name / "dataset"
        report = build_dataset(messages, data, settings, progress=False)
        run_dir = work / name / "run"
        train(
            TrainSettings(
                base_model=model,
                data=data,
                output_dir=run_dir,
                max_steps=demo.train_steps,
                batch_size=demo.batch_size,
                max_seq_len=MAX_SEQ_LEN,
                lr=demo.learning_rate,
                threads=demo.n_threads,
                seed=demo.seed,
                bf16=False,  # fp32 everywhere, as the demo: the same numbers on every CPU
            ),
            progress=False,
            on_step=functools.partial(_step, name),
        )
        result = evaluate(
            run_dir,
            data,
            max_samples=args.eval_samples,
            seed=demo.seed,
            max_new_tokens=args.max_new_tokens,
            progress=False,
        )
        rows.append(
            Row(
                name,
                report.samples["train"],
                report.samples["val"],
                result.base_perplexity,
                result.twin_perplexity,
                result.base_style_distance,
                result.twin_style_distance,
                time.perf_counter() - started,
            )
        )
        print(f"{name}: twin perplexity {result.twin_perplexity:.3f}, style {result.twin_style_distance:.3f}")
    return rows


def _step(variant: str, step: int, total: int, loss: float) -> None:
    print(f"  {variant}: step {step}/{total}, loss {loss:.3f}", flush=True)


def machine() -> str:
    import torch

    cpu = " ".join(part for part in (platform.machine(), platform.processor()) if part)
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs (shared), "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def table(rows: list[Row], args: argparse.Namespace) -> list[str]:
    lines = [
        f"The demo's generated history ({args.messages} messages, seed {args.seed}) and base model "
        f"(`{args.base_model}`), LoRA with the demo's settings ({args.steps} steps, batch 2, lr 1e-3, "
        f"fp32) at max length {MAX_SEQ_LEN}; each variant builds its own dataset (same conversations "
        f"and split, its own system prompts) and is scored on its own held-out samples "
        f"({args.eval_samples} at most, greedy replies of up to {args.max_new_tokens} tokens). "
        f"Lower is better in every column. Machine: {machine()}.",
        "",
        "| variant | dataset overrides | train / val samples | base perplexity | twin perplexity "
        "| base style distance | twin style distance | minutes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        overrides = {k: v for part in row.variant.split("+") for k, v in PARTS[part].items()}
        shown = ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "—"
        lines.append(
            f"| {row.variant} | {shown} | {row.train_samples} / {row.val_samples} | "
            f"{row.base_perplexity:.2f} | {row.twin_perplexity:.2f} | {row.base_style:.3f} | "
            f"{row.twin_style:.3f} | {row.seconds / 60:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="none,examples", help="comma list; parts: " + ", ".join(PARTS))
    parser.add_argument("--messages", type=int, default=DEMO.messages)
    parser.add_argument("--steps", type=int, default=DEMO.train_steps)
    parser.add_argument("--seed", type=int, default=DEMO.seed)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--base-model", default="smollm2", help="the demo's SmolLM2-135M-Instruct by default")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, few messages and steps")
    parser.add_argument("--dir", default=None, help="where the runs are written (default: the temp dir)")
    parser.add_argument(
        "--write-docs", action="store_true", help=f"replace '{HEADING}' in docs/benchmarks.md"
    )
    args = parser.parse_args()
    demo = DemoSettings(seed=args.seed)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:  # every variant is checked before minutes are spent on the first
        chosen = {name: variant_settings(name, demo_dataset_settings(demo)) for name in names}
    except InputError as exc:
        sys.exit(f"context_ablation: error: {exc}")
    with tempfile.TemporaryDirectory(prefix="twin-context-ablation-", dir=args.dir) as tmp:
        work = Path(tmp)
        if args.quick:
            from trainer.tiny import build_tiny_model

            args.base_model = str(build_tiny_model(work / "tiny-llama"))
            args.messages, args.steps, args.eval_samples, args.max_new_tokens = 600, 2, 4, 4
        rows = run(args, work, chosen)
    lines = table(rows, args)
    print("\n".join(lines))
    if args.write_docs:
        replace_section(HEADING, lines)


if __name__ == "__main__":
    main()
