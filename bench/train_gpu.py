"""GPU training throughput on a randomly initialised Qwen3-8B-shaped model (weights do not matter).

For LoRA and QLoRA, compares the usual script (batches padded to the max length, logits
over every position, loss on all tokens) with the project's path (packed rows with
position-id resets, logits only at target positions, optionally Liger kernels). Reports
non-pad tokens/s, MFU and peak GPU memory.

MFU uses the usual 6·N·tokens model FLOPs (N = parameters without embeddings) against the
GPU's dense bf16 peak (`--peak-tflops`, 989 for an H100 SXM). LoRA on a frozen base
really does about 4·N (no weight gradients), so 6N-MFU is the conventional, comparable number.

    python bench/train_gpu.py --mode lora --steps 20          # on a CUDA machine
    python bench/train_gpu.py --tiny --device cpu --steps 2   # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
)


def chat_lengths(count: int, max_len: int, seed: int = 0) -> list[tuple[int, int]]:
    """(tokens, reply tokens) of chat-like samples: long-tailed lengths, replies ~25% of tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = min(max_len, max(16, int(rng.lognormvariate(math.log(160), 0.7))))
        out.append((length, max(2, length // 4)))
    return out


def make_samples(lengths: list[tuple[int, int]], vocab: int) -> list:
    import torch

    from trainer.data import IGNORE, Encoded

    samples = []
    for length, reply in lengths:
        ids = torch.randint(5, vocab, (length,)).tolist()
        targets = [IGNORE] * (length - reply) + ids[length - reply + 1 :] + [IGNORE]
        samples.append(Encoded(ids, targets))
    return samples


def build_model(args: argparse.Namespace, qlora: bool):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen3Config

    config = Qwen3Config(**(TINY if args.tiny else QWEN3_8B))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if not qlora:
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
        return model, config
    # bitsandbytes quantises at load time, so the random model goes through disk once.
    with tempfile.TemporaryDirectory(prefix="qwen3-8b-random-") as tmp:
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, device_map={"": args.device}, attn_implementation=args.attn
        )
    return model, config


def run(args: argparse.Namespace, *, qlora: bool, project: bool, liger: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from trainer.data import IGNORE, collate_padded, epoch_batches
    from trainer.train import owner_loss

    torch.manual_seed(0)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3

        apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False)
    model, config = build_model(args, qlora)
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    samples = make_samples(chat_lengths(args.samples, args.max_len), config.vocab_size)
    if project:
        batches = epoch_batches(
            samples, batch_size=args.rows, row_len=args.row_len, pack=True, pad_id=0, seed=0
        )
    else:
        per = args.batch
        batches = []
        for i in range(0, len(samples), per):
            group = samples[i : i + per]
            batch = collate_padded(group, pad_id=0)
            # The usual script: pad to the max length, learn every real token.
            pad = args.max_len - batch.input_ids.shape[1]
            batch.input_ids = torch.nn.functional.pad(batch.input_ids, (0, pad))
            batch.attention_mask = torch.nn.functional.pad(batch.attention_mask, (0, pad))
            batch.position_ids = torch.arange(args.max_len).expand(len(group), -1)
            real = batch.attention_mask.bool()
            shifted = torch.full_like(batch.input_ids, IGNORE)
            shifted[:, :-1] = torch.where(real[:, 1:], batch.input_ids[:, 1:], IGNORE)
            batch.targets = shifted
            batches.append(batch)
    device = torch.device(args.device)
    tokens = 0
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    started = None
    for step, batch in enumerate(batches[: args.steps + 1]):
        if step == 1:  # the first step warms kernels and the allocator up
            _sync(device)
            started, tokens = time.perf_counter(), 0
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if project:
                loss_sum, count = owner_loss(model, batch)
            else:
                # Full logits at every position, as a plain `model(**batch, labels=...)` computes them.
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits.float()
                loss_sum = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum"
                )
                count = int((batch.targets != IGNORE).sum())
        (loss_sum / max(count, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.tokens
    _sync(device)
    seconds = time.perf_counter() - started
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lora_" not in n)
    if qlora:  # 4-bit weights are packed two per byte; count the logical parameters
        n_params = _logical_params(config)
    rate = tokens / seconds
    return {
        "mode": "qlora" if qlora else "lora",
        "path": ("project" + (" + liger" if liger else "")) if project else "baseline (padded, all tokens)",
        "non_pad_tokens_per_s": round(rate, 1),
        "mfu": round(6 * n_params * rate / (args.peak_tflops * 1e12), 4),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def _logical_params(config) -> int:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    return layers * (h * q + 2 * h * kv + q * h + 3 * h * i) + config.vocab_size * h


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["lora", "qlora", "both"], default="both")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="samples per baseline batch")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per project batch")
    parser.add_argument("--row-len", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--liger", action="store_true", help="also run the project path with Liger kernels")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: check the script, not the GPU")
    parser.add_argument(
        "--write-docs", action="store_true", help="replace the GPU table in docs/benchmarks.md"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # one measurement, in its own process (see below)
        mode, project, liger = args.variant.split(",")
        result = run(args, qlora=mode == "qlora", project=project == "1", liger=liger == "1")
        print("RESULT " + json.dumps(result), flush=True)
        return

    # Each variant runs in a fresh process: Liger patches transformers' classes for the rest of
    # a process, and peak GPU memory must be each variant's own.
    results = []
    for mode in ("lora", "qlora") if args.mode == "both" else (args.mode,):
        if mode == "qlora" and args.device != "cuda" and not args.tiny:
            # bitsandbytes' CPU backend runs NF4 too, but its speed says nothing about a GPU's.
            print("qlora is measured on CUDA only; skipped on", args.device, flush=True)
            continue
        variants = [(False, False), (True, False)] + ([(True, True)] if args.liger else [])
        for project, liger in variants:
            variant = f"{mode},{int(project)},{int(liger)}"
            done = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                capture_output=True,
                text=True,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT ") :])
            print(json.dumps(result), flush=True)
            results.append(result)
    lines = table(results, args)
    print("\n".join(lines))
    if args.write_docs:
        from _docs import replace_section

        replace_section(GPU_HEADING, lines)


GPU_HEADING = "## Training on a GPU (`bench/train_gpu.py`)"


def table(results: list[dict], args: argparse.Namespace) -> list[str]:
    """The results as markdown, each project path also as a ratio to its mode's baseline."""
    shape = "tiny test shapes" if args.tiny else "Qwen3-8B shapes, random weights"
    lines = [
        f"{shape}, {args.steps} steps after one warm-up, "
        f"baseline batches {args.batch}×{args.max_len} padded, "
        f"project rows {args.rows}×{args.row_len} packed, attention `{args.attn}`, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, MFU against {args.peak_tflops:g} TFLOPS.",
        "",
        "| mode | path | non-pad tokens/s | × baseline | MFU (6N) | peak GPU memory (GB) | × baseline |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    baseline: dict[str, dict] = {}
    for r in results:
        base = baseline.setdefault(r["mode"], r)
        speed = r["non_pad_tokens_per_s"] / base["non_pad_tokens_per_s"]
        memory = (
            (r["peak_mem_gb"] / base["peak_mem_gb"]) if r["peak_mem_gb"] and base["peak_mem_gb"] else None
        )
        lines.append(
            f"| {r['mode']} | {r['path']} | {r['non_pad_tokens_per_s']:.0f} | {speed:.2f}× | {r['mfu']:.1%} "
            f"| {r['peak_mem_gb'] if r['peak_mem_gb'] is not None else '—'} "
            f"| {f'{memory:.2f}×' if memory is not None else '—'} |"
        )
    lines += ["", "Goals (LoRA on an H100): ≥ 2× the baseline's tokens/s, ≥ 40% MFU, peak memory ≤ 0.6×.", ""]
    return lines


if __name__ == "__main__":
    main()
