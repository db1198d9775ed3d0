"""The LLM cleaning pass: an OpenAI-compatible model judges each sample (keep/drop, 1–5, reason).

Requests run with bounded concurrency and retries with exponential backoff. Every
verdict is appended to a JSONL cache keyed by the sample's content hash (and the judge
model), flushed line by line, so an interrupted run resumes where it stopped and a
re-run costs nothing. Samples are redacted before they get here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.dataset.samples import Sample
from pipeline.dataset.settings import LLMSettings
from pipeline.errors import TwinError
from pipeline.files import PRIVATE_FILE_MODE

log = logging.getLogger(__name__)

PROMPT_VERSION = "v1"

JUDGE_PROMPT = """你在为“数字分身”微调挑选QQ聊天训练数据。下面是一段对话，“我”是要模仿的人。
判断最后一条“我”的回复是否值得学习：自然、像真人聊天、和上文相关的保留；乱码、广告、\
机器人消息、刷屏、与上文毫无关系或只有占位符的丢弃。
只输出一个JSON对象，不要别的文字：{"keep": true或false, "score": 1到5的整数, "reason": "一句话理由"}"""


@dataclass(slots=True)
class Verdict:
    """What the judge said about one sample."""

    keep: bool
    score: int
    reason: str


class LLMUnavailable(TwinError):
    """The judging server cannot be reached (or refuses our key)."""


def cache_key(sample: Sample, model: str) -> str:
    """Content hash + judge model + prompt version: a different judge re-judges."""
    return key_for_hash(sample.content_hash(), model)


def key_for_hash(content_hash: str, model: str) -> str:
    """`cache_key` of a sample whose `content_hash()` is already known."""
    return f"{PROMPT_VERSION}:{model}:{content_hash}"


def render_for_judge(sample: Sample) -> str:
    """The conversation as plain lines, the owner as “我”."""
    lines = []
    for m in sample.messages:
        if m["role"] == "system":
            continue
        who = "我" if m["role"] == "assistant" else "对方"
        lines.append(f"{who}：{m['content'] or '（没有回复）'}")
    return "\n".join(lines)


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_verdict(text: str) -> Verdict:
    """The first JSON object in the model's answer → Verdict; ValueError if there is none."""
    text = re.sub(r"<think>.*?</think>", "", text or "", flags=re.DOTALL)
    match = _JSON_OBJECT.search(text)
    if match is None:
        raise ValueError("no JSON object in the answer")
    data = json.loads(match.group(0))
    keep = data.get("keep")
    if isinstance(keep, str):
        keep = keep.strip().lower() in ("true", "yes", "keep", "1")
    score = int(data.get("score", 3))
    return Verdict(keep=bool(keep), score=min(5, max(1, score)), reason=str(data.get("reason", ""))[:200])


class VerdictCache:
    """Append-only JSONL of `{"key", "keep", "score", "reason"}`; the last line for a key wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.verdicts: dict[str, Verdict] = {}
        if path.exists():
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                        self.verdicts[row["key"]] = Verdict(row["keep"], int(row["score"]), row["reason"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a crash: that sample is simply judged again
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
        self._out = os.fdopen(fd, "a", encoding="utf-8")

    def get(self, key: str) -> Verdict | None:
        return self.verdicts.get(key)

    def put(self, key: str, verdict: Verdict) -> None:
        self.verdicts[key] = verdict
        self._out.write(json.dumps({"key": key, **asdict(verdict)}, ensure_ascii=False) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.close()


@dataclass(slots=True)
class JudgeStats:
    judged: int = 0
    cached: int = 0
    errors: int = 0
    retries: int = 0


def _client(settings: LLMSettings):
    from openai import AsyncOpenAI

    # Retries are ours (with backoff we control and count), not the client's.
    return AsyncOpenAI(
        base_url=settings.api_base, api_key=settings.api_key, timeout=settings.timeout_s, max_retries=0
    )


async def check_server(settings: LLMSettings, timeout_s: float = 5.0) -> None:
    """Fail fast with one clear line when the server is down or refuses the key."""
    import openai

    client = _client(settings)
    try:
        await client.with_options(timeout=timeout_s).models.list()
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        raise LLMUnavailable(
            f"{settings.api_base}: LLM server unreachable ({type(exc).__name__}); start it, fix --api-base, "
            "or pass --llm-optional to continue rule-only"
        ) from None
    except openai.AuthenticationError:
        raise LLMUnavailable(f"{settings.api_base}: the LLM server refused the API key (401)") from None
    except openai.APIStatusError:
        pass  # it answers HTTP; some servers just do not implement /models
    finally:
        await client.close()


async def judge_samples(
    samples: Iterable[Sample],
    settings: LLMSettings,
    cache: VerdictCache,
    *,
    on_done: Callable[[int], None] | None = None,
) -> tuple[dict[str, Verdict], JudgeStats]:
    """Judge every sample (cache first), `settings.concurrency` requests at a time.

    Returns verdicts by cache key; samples whose requests kept failing are absent (kept
    unjudged, and judged again next run).
    """
    import openai

    client = _client(settings)
    stats = JudgeStats()
    verdicts: dict[str, Verdict] = {}
    queue: asyncio.Queue[Sample | None] = asyncio.Queue(maxsize=settings.concurrency * 4)

    async def ask(sample: Sample) -> Verdict | None:
        for attempt in range(settings.max_attempts):
            if attempt:
                stats.retries += 1
                await asyncio.sleep(settings.backoff_s * 2 ** (attempt - 1))
            try:
                response = await client.chat.completions.create(
                    model=settings.model,
                    messages=[
                        {"role": "system", "content": JUDGE_PROMPT},
                        {"role": "user", "content": render_for_judge(sample)},
                    ],
                    temperature=0,
                    max_tokens=200,
                )
                return parse_verdict(response.choices[0].message.content or "")
            except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError):
                continue
            except openai.APIStatusError as exc:
                if exc.status_code >= 500:
                    continue
                log.warning("LLM judge: HTTP %s, sample left unjudged", exc.status_code)
                return None
            except (ValueError, IndexError, AttributeError, TypeError):
                continue  # an answer we could not read: ask again
        return None

    async def worker() -> None:
        while (sample := await queue.get()) is not None:
            key = cache_key(sample, settings.model)
            verdict = cache.get(key)
            if verdict is not None:
                stats.cached += 1
            else:
                verdict = await ask(sample)
                if verdict is None:
                    stats.errors += 1
                else:
                    stats.judged += 1
                    cache.put(key, verdict)
            if verdict is not None:
                verdicts[key] = verdict
            if on_done is not None:
                on_done(1)

    workers = [asyncio.create_task(worker()) for _ in range(settings.concurrency)]
    try:
        for sample in samples:
            await queue.put(sample)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await client.close()
    return verdicts, stats


def keeps(verdict: Verdict | None, min_score: int) -> bool:
    """A sample stays unless the judge said drop or scored it below `min_score`."""
    return verdict is None or (verdict.keep and verdict.score >= min_score)
