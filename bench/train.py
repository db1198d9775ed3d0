"""Training throughput: the project's trainer vs the usual fine-tuning script, side by side.

Baseline = transformers `Trainer` + peft LoRA with the same rank and target modules, every
batch padded to the maximum length and trained on all tokens (what most fine-tuning scripts
do). Project = `trainer.train` (owner-only targets, packing, logits only at targets).
Same base model (SmolLM2-135M-Instruct, dequantised once to a HF copy), same data, same
steps, same batch size and sequence length, same precision. Each side runs in its own
process, so peak memory is its own. Reported: non-pad tokens/s (steady state, first step
excluded) and peak RSS during training. The sides alternate for `--trials` rounds, so both see
the same machine load; the medians are reported. The default length is `twin train`'s own
default `max_seq_len` (384).

    .venv/bin/python bench/train.py [--steps 8 --batch 4 --seq-len 384 --threads 2 --trials 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _docs import replace_section  # noqa: E402  (bench/ is on sys.path when a script runs)

FRIENDS = [
    "在吗",
    "吃饭了吗",
    "明天去哪",
    "今天好累",
    "周末打游戏吗",
    "你看那个新闻了吗",
    "晚上一起吃饭？",
    "哈哈哈哈",
]
REPLIES = [
    "绝绝子",
    "好耶[贴贴]",
    "懂了",
    "冲冲冲",
    "[doge]",
    "再说吧",
    "可以啊",
    "不行 明天吧",
    "哈哈哈笑死",
]


def write_dataset(directory: Path, samples: int, seed: int = 0) -> None:
    """Short multi-turn chats like a real QQ export: a system prompt, 1–4 turns, short replies."""
    from pipeline.chatformat import system_prompt

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "train.jsonl").open("w", encoding="utf-8") as handle:
        for _ in range(samples):
            messages = [{"role": "system", "content": system_prompt("小明")}]
            for _ in range(rng.randint(1, 4)):
                messages.append(
                    {"role": "user", "content": "\n".join(rng.sample(FRIENDS, rng.randint(1, 2)))}
                )
                messages.append(
                    {"role": "assistant", "content": " ".join(rng.sample(REPLIES, rng.randint(1, 2)))}
                )
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def write_base(directory: Path) -> None:
    """SmolLM2's cached HF copy (GGUF de-quantised once), so neither side pays for GGUF parsing."""
    from trainer.models import hf_copy, resolve_base

    directory.symlink_to(hf_copy(resolve_base("smollm2")).source, target_is_directory=True)


class PeakRss:
    """Samples this process's resident memory every 20 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as handle:
                self.peak = max(self.peak, int(handle.read().split()[1]) * page)
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_project(args: argparse.Namespace) -> dict:
    from trainer.config import TrainSettings
    from trainer.train import train

    run = Path(args.work) / "project-run"
    settings = TrainSettings(
        base_model=str(Path(args.work) / "base"),
        data=Path(args.work) / "data",
        output_dir=run,
        max_steps=args.steps,
        batch_size=args.batch,
        max_seq_len=args.seq_len,
        threads=args.threads,
        lora_r=16,
        save_every=10**6,
    )
    with PeakRss() as rss:
        train(settings, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    curve = metrics["loss_curve"]
    tokens = curve[-1]["tokens"] - curve[0]["tokens"]
    seconds = curve[-1]["elapsed_s"] - curve[0]["elapsed_s"]
    return {
        "side": "project",
        "non_pad_tokens_per_s": tokens / seconds,
        "peak_rss_mb": rss.peak / 2**20,
        "precision": metrics.get("precision"),
        "non_pad_share": 1.0,
    }


def run_baseline(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from trainer.train import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    base = Path(args.work) / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line)["messages"] for line in (Path(args.work) / "data" / "train.jsonl").open()]
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows]
    encoded = [
        tokenizer(t, add_special_tokens=False, truncation=True, max_length=args.seq_len) for t in texts
    ]
    dataset = [{"input_ids": e["input_ids"]} for e in encoded]
    counted = {"non_pad": [], "padded": []}

    def collate(batch: list[dict]) -> dict:
        # Pad every batch to the maximum length; labels on every real token.
        out = tokenizer.pad(batch, padding="max_length", max_length=args.seq_len, return_tensors="pt")
        labels = out["input_ids"].clone()
        labels[out["attention_mask"] == 0] = -100
        out["labels"] = labels
        counted["non_pad"].append(int(out["attention_mask"].sum()))
        counted["padded"].append(out["input_ids"].numel())
        return out

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            times.append(time.perf_counter())

    bf16 = cpu_has_native_bf16()
    training_args = TrainingArguments(
        output_dir=str(Path(args.work) / "baseline-run"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=round(args.steps * 0.05),
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=bf16,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collate, callbacks=[StepTimes()]
    )
    with PeakRss() as rss:
        trainer.train()
    # Steady state: steps 2..N (the collator may prefetch one batch beyond the last step).
    non_pad = sum(counted["non_pad"][1 : args.steps])
    return {
        "side": "baseline",
        "non_pad_tokens_per_s": non_pad / (times[-1] - times[0]),
        "peak_rss_mb": rss.peak / 2**20,
        "precision": "fp32 + bf16 autocast" if bf16 else "fp32",
        "non_pad_share": sum(counted["non_pad"]) / sum(counted["padded"]),
    }


def median_result(runs: list[dict]) -> dict:
    """One side's trials: the median of each number, the rest from the first trial."""
    out = dict(runs[0])
    for key in ("non_pad_tokens_per_s", "peak_rss_mb", "non_pad_share"):
        out[key] = statistics.median(run[key] for run in runs)
    return out


TRAIN_HEADING = "## Training (`bench/train.py`)"


def docs_section(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    project, baseline = results["project"], results["baseline"]
    speedup = project["non_pad_tokens_per_s"] / baseline["non_pad_tokens_per_s"]
    memory = project["peak_rss_mb"] / baseline["peak_rss_mb"]
    return [
        "SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, "
        f"{args.steps} steps × batch {args.batch}, max length {args.seq_len}, "
        f"{args.threads} CPU threads, {project['precision']} on both sides, median of {args.trials} "
        "alternating trials; "
        "synthetic short multi-turn QQ chats (system prompt + 1–4 turns). "
        "Baseline: transformers `Trainer` + peft, every batch padded to the max length, "
        "loss on all tokens "
        f"({baseline['non_pad_share']:.0%} of its tokens are real). Project: `trainer.train` (packing, "
        "owner-only loss, logits only at targets). Steady state (first step excluded), shared "
        "machine.",
        "",
        "| | non-pad tokens/s | peak RSS during training (MB) |",
        "| --- | ---: | ---: |",
        f"| baseline (Trainer + peft, padded) | {baseline['non_pad_tokens_per_s']:.0f} | "
        f"{baseline['peak_rss_mb']:.0f} |",
        f"| project (`twin train`) | {project['non_pad_tokens_per_s']:.0f} | {project['peak_rss_mb']:.0f} |",
        f"| **project / baseline** | **{speedup:.2f}×** | **{memory:.2f}×** |",
        "",
        "Goal: ≥ 1.5× tokens/s on CPU. Re-run: `.venv/bin/python bench/train.py --write-docs`.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--side", choices=["project", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        result = run_project(args) if args.side == "project" else run_baseline(args)
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="bench-train-") as work:
        write_dataset(Path(work) / "data", args.samples)
        write_base(Path(work) / "base")
        trials: dict[str, list[dict]] = {"baseline": [], "project": []}
        for trial in range(args.trials):
            for side in ("baseline", "project"):
                shutil.rmtree(Path(work) / f"{side}-run", ignore_errors=True)
                command = [sys.executable, __file__, "--side", side, "--work", work]
                command += ["--steps", str(args.steps), "--batch", str(args.batch)]
                command += ["--seq-len", str(args.seq_len), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
                trials[side].append(json.loads(lines[-1][len("RESULT ") :]))
                print(f"trial {trial + 1}", side, trials[side][-1], flush=True)
    results = {side: median_result(runs) for side, runs in trials.items()}
    lines = docs_section(results, args)
    print("\n".join(lines))
    if args.write_docs:
        replace_section(TRAIN_HEADING, lines)


if __name__ == "__main__":
    main()
