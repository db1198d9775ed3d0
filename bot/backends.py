"""Where replies come from: llama.cpp in-process, or any OpenAI-compatible server.

Both take a `messages` list built by `pipeline.chatformat.to_messages` and return the raw
text; cleaning, pacing and filtering happen in the caller. Chat text is data, never control:
llama.cpp tokenises message content with special-token parsing off, and the OpenAI backend
(which cannot) removes special-token text from every content before the request. No NoneBot
imports here.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bot.memory import estimate_tokens, fit_messages
from pipeline.chatformat import (
    CHAT_TEMPLATE_KWARGS,
    PromptPiece,
    neutralise_messages,
    render_chat_pieces,
    render_chat_template,
)
from pipeline.llama_prompt import SegmentCache, prompt_token_ids

log = logging.getLogger(__name__)


class BackendClosed(RuntimeError):
    """The backend is shutting down; the request was not answered."""


@dataclass(slots=True)
class Generation:
    """One reply as the backend produced it."""

    text: str
    version: str
    tokens: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class SamplingSettings:
    max_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = -1
    repeat_penalty: float = 1.1


class Backend(Protocol):
    name: str
    version: str

    async def start(self) -> None: ...
    async def generate(self, messages: Sequence[dict[str, str]]) -> Generation: ...
    async def swap(self, gguf: Path, version: str) -> None: ...
    def queue_length(self) -> int: ...
    async def close(self) -> None: ...


# --------------------------------------------------------------------------- llama.cpp


@dataclass(slots=True)
class _Job:
    run: Callable[[], Any]
    future: Future


class LlamaCppBackend:
    """One `Llama` loaded and used on one dedicated thread; requests queue in arrival order.

    llama.cpp is not thread-safe and two threads on two busy cores collapse, so everything that
    touches the model (load, generate, swap, close) runs as a job on the same worker thread, and
    the event loop only awaits futures.
    """

    name = "llama_cpp"

    def __init__(
        self,
        gguf: Path,
        version: str,
        *,
        n_threads: int = 2,
        n_ctx: int = 2048,
        sampling: SamplingSettings | None = None,
        special_tokens: Sequence[str] = (),
    ) -> None:
        self.gguf = Path(gguf)
        self.version = version
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.sampling = sampling or SamplingSettings()
        self.special_tokens = tuple(special_tokens)  # removed from chat text only if a template needs it
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="twin-llama", daemon=True)
        self._llm: Any = None
        self._template = ""
        self._bos = ""
        self._eos = ""
        self._segments: SegmentCache = {}

    # ---- worker thread side
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(job.run())
            except BaseException as exc:  # handed to the awaiting coroutine
                job.future.set_exception(exc)
        self._unload()

    def _load(self, gguf: Path) -> None:
        """Load `gguf`; the old model is freed only once the new one loaded (a bad file changes nothing)."""
        from llama_cpp import Llama

        llm = Llama(
            model_path=str(gguf),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            seed=self.sampling.seed if self.sampling.seed >= 0 else 0xFFFFFFFF,  # llama.cpp's 'random'
            verbose=False,
        )
        template = llm.metadata.get("tokenizer.chat_template", "")
        if not template:
            llm.close()
            raise ValueError(f"{gguf}: the GGUF has no tokenizer.chat_template")
        self._unload()
        self._llm = llm
        self._template = template
        self._segments = {}
        self._bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "ignore")
        self._eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "ignore")

    def _unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _generate(self, messages: Sequence[dict[str, str]], version: str) -> Generation:
        from llama_cpp import StoppingCriteriaList

        if self._stopping.is_set():
            raise BackendClosed("backend is shutting down")
        started = time.perf_counter()
        s = self.sampling
        # Forget the oldest turns, then cut the last one, rather than fail or fall silent.
        measured: tuple[list[dict[str, str]], list[int]] | None = None

        def count(candidate: Sequence[dict[str, str]]) -> int:
            nonlocal measured
            ids = self.prompt_tokens(candidate)
            measured = ([dict(m) for m in candidate], ids)
            return len(ids)

        messages = fit_messages(messages, self.n_ctx - s.max_tokens, count)
        # Usually the prompt fitted as it was: its ids were just counted, not tokenised again.
        prompt = measured[1] if measured and measured[0] == messages else self.prompt_tokens(messages)
        out = self._llm.create_completion(
            prompt,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            repeat_penalty=s.repeat_penalty,
            seed=s.seed if s.seed >= 0 else None,
            stop=[self._eos] if self._eos else None,
            stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: self._stopping.is_set()]),
        )
        if self._stopping.is_set():
            raise BackendClosed("backend is shutting down")
        return Generation(
            text=out["choices"][0]["text"],
            version=version,
            tokens=int(out["usage"]["completion_tokens"]),
            seconds=time.perf_counter() - started,
        )

    def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The exact prompt text, rendered from the GGUF's own chat template (thinking off)."""
        return render_chat_template(self._template, messages, bos_token=self._bos, eos_token=self._eos)

    def prompt_pieces(self, messages: Sequence[dict[str, str]]) -> list[PromptPiece]:
        """`render_prompt` split into template text and message content (`render_chat_pieces`)."""
        return render_chat_pieces(self._template, messages, bos_token=self._bos, eos_token=self._eos)

    def prompt_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt as tokens: special tokens only where the template put them, never from chat text."""
        return prompt_token_ids(
            self._llm,
            self._template,
            messages,
            bos=self._bos,
            eos=self._eos,
            cache=self._segments,
            special_tokens=self.special_tokens,
        )

    # ---- event loop side
    async def _submit(self, run: Callable[[], Any]) -> Any:
        if self._stopping.is_set():
            raise BackendClosed("backend is shutting down")
        future: Future = Future()
        self._pending += 1
        try:
            self._jobs.put(_Job(run, future))
            return await asyncio.wrap_future(future)
        finally:
            self._pending -= 1

    async def start(self) -> None:
        self._thread.start()
        await self._submit(lambda: self._load(self.gguf))
        log.info("llama.cpp loaded %s (version %s, %d threads)", self.gguf.name, self.version, self.n_threads)

    async def generate(self, messages: Sequence[dict[str, str]]) -> Generation:
        # The version is bound when the job runs: jobs queued before a swap run on the old model.
        return await self._submit(lambda: self._generate(list(messages), self.version))

    async def swap(self, gguf: Path, version: str) -> None:
        """Serve `gguf` from now on: queued requests finish first on the old model, none is lost."""

        def load() -> None:
            self._load(gguf)
            self.gguf, self.version = Path(gguf), version

        await self._submit(load)
        log.info("llama.cpp now serving %s (version %s)", Path(gguf).name, version)

    def queue_length(self) -> int:
        return self._pending

    async def close(self) -> None:
        """Refuse queued requests, stop the running one at its next token, free the model."""
        self._stopping.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(BackendClosed("backend is shutting down"))
        self._jobs.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 10)


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM, llama-server, LM Studio, Ollama) via AsyncOpenAI."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "EMPTY",
        timeout: float = 60.0,
        retries: int = 2,
        sampling: SamplingSettings | None = None,
        special_tokens: Sequence[str] = (),
        n_ctx: int = 2048,
    ) -> None:
        from openai import AsyncOpenAI

        self.version = model
        self.n_ctx = n_ctx  # the server's window is unknown here: prompts are bounded by this too
        self.sampling = sampling or SamplingSettings()
        self.special_tokens = tuple(special_tokens)  # beyond the common families (`TWIN_SPECIAL_TOKENS`)
        self._client = AsyncOpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=retries
        )
        self._pending = 0

    async def start(self) -> None:
        pass  # the server may come up after the bot; failures surface per request

    def bounded(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """What is posted: special-token text neutralised (the server renders the template from
        text and may parse it), and within `n_ctx` less the reply by a safe upper-bound estimate."""
        clean = neutralise_messages(messages, self.special_tokens)
        return fit_messages(clean, self.n_ctx - self.sampling.max_tokens, estimate_tokens)

    async def generate(self, messages: Sequence[dict[str, str]]) -> Generation:
        s = self.sampling
        started = time.perf_counter()
        self._pending += 1
        try:
            seed = {"seed": s.seed} if s.seed >= 0 else {}
            # The server renders the template from text and may parse special tokens in it.
            response = await self._client.chat.completions.create(
                model=self.version,
                messages=self.bounded(messages),  # type: ignore[arg-type]
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                extra_body={
                    "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
                    "repetition_penalty": s.repeat_penalty,  # vLLM / llama-server; others ignore it
                },
                **seed,
            )
        finally:
            self._pending -= 1
        text = response.choices[0].message.content or ""
        tokens = response.usage.completion_tokens if response.usage else 0
        elapsed = time.perf_counter() - started
        return Generation(text=text, version=self.version, tokens=tokens, seconds=elapsed)

    async def swap(self, gguf: Path, version: str) -> None:
        log.warning("the openai backend serves whatever its server loaded; swap to %s ignored", version)

    def queue_length(self) -> int:
        return self._pending

    async def close(self) -> None:
        await self._client.close()
