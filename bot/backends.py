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
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from bot.memory import estimate_tokens, fit_messages
from pipeline.chatformat import (
    CHAT_TEMPLATE_KWARGS,
    PromptPiece,
    neutralise_messages,
    render_chat_pieces,
    render_chat_template,
)
from pipeline.llama_prompt import SegmentCache, prompt_token_ids
from pipeline.registry import lora_module_name

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    # `gguf`: what serves `version`, the GGUF for llama.cpp, the LoRA adapter directory for openai.
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


# Seconds a server that failed rests before requests try it again (one timeout per rest, not per request).
BREAKER_COOLDOWN = 30.0
# vLLM's answer to loading an adapter under a name it already serves (HTTP 400), which is what we wanted.
_ALREADY_LOADED = "already been loaded"


class SwapFailed(RuntimeError):
    """A server could not load the new version's adapter; the old version still serves."""


def shown_url(url: str) -> str:
    """`url` without any user:password part, for logs and status."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@dataclass(slots=True)
class _Server:
    url: str
    client: Any  # AsyncOpenAI
    resting_until: float = 0.0  # the circuit breaker: open (skipped) until then

    def failed(self, cooldown: float) -> None:
        self.resting_until = time.monotonic() + cooldown


def _failover_error(exc: BaseException) -> bool:
    """A server that is down or broken (connection, timeout, 5xx), as opposed to a bad request."""
    from openai import APIConnectionError, APIStatusError

    return isinstance(exc, APIConnectionError) or (isinstance(exc, APIStatusError) and exc.status_code >= 500)


def _cause(server: _Server, exc: BaseException) -> str:
    from openai import APIStatusError

    detail = f"HTTP {exc.status_code}" if isinstance(exc, APIStatusError) else type(exc).__name__
    return f"{shown_url(server.url)}: {detail}"


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM, llama-server, LM Studio, Ollama) via AsyncOpenAI.

    Several servers fail over in order. With `lora`, `version` is a registry version served
    by vLLM as the LoRA `twin-<version>-<fingerprint>` (`adapter` its directory); with
    `runtime_lora` a swap first loads the new adapter into every server (vLLM's
    `/v1/load_lora_adapter`). docs/serving.md.
    """

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
        fallback_urls: Sequence[str] = (),
        lora: bool = False,
        runtime_lora: bool = False,
        adapter: Path | None = None,
        cooldown: float = BREAKER_COOLDOWN,
    ) -> None:
        from openai import AsyncOpenAI

        self.version = model
        self.lora = lora
        self.runtime_lora = runtime_lora and lora
        if lora and adapter is None:
            raise ValueError(f"{model}: serving a registry version as a LoRA needs its adapter directory")
        # the name requests ask for
        self.model = lora_module_name(model, adapter) if lora and adapter is not None else model
        self.adapter = adapter  # the serving version's adapter directory, for runtime loading
        self.n_ctx = n_ctx  # the server's window is unknown here: prompts are bounded by this too
        self.sampling = sampling or SamplingSettings()
        self.special_tokens = tuple(special_tokens)  # beyond the common families (`TWIN_SPECIAL_TOKENS`)
        self.cooldown = cooldown
        self._servers = [
            _Server(
                url,
                AsyncOpenAI(base_url=url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=retries),
            )
            for url in (base_url, *fallback_urls)
        ]
        self.serving_url = base_url  # the server that answered last
        self._loaded = [self.model] if lora else []  # adapters that may sit in the servers, oldest first
        self._pending = 0

    async def start(self) -> None:
        # The server may come up after the bot: failures surface per request, and an adapter
        # the server lacks is loaded when first asked for (`_ask`), not here at startup.
        pass

    def bounded(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """What is posted: special-token text neutralised (the server renders the template from
        text and may parse it), and within `n_ctx` less the reply by a safe upper-bound estimate."""
        clean = neutralise_messages(messages, self.special_tokens)
        return fit_messages(clean, self.n_ctx - self.sampling.max_tokens, estimate_tokens)

    async def generate(self, messages: Sequence[dict[str, str]]) -> Generation:
        s = self.sampling
        started = time.perf_counter()
        model, version, adapter = self.model, self.version, self.adapter  # a swap meanwhile: next request
        seed = {"seed": s.seed} if s.seed >= 0 else {}
        request = {
            "model": model,
            "messages": self.bounded(messages),
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "extra_body": {
                "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
                "repetition_penalty": s.repeat_penalty,  # vLLM / llama-server; others ignore it
            },
            **seed,
        }
        self._pending += 1
        try:
            response = await self._on_servers(lambda server: self._ask(server, request, adapter))
        finally:
            self._pending -= 1
        text = response.choices[0].message.content or ""
        tokens = response.usage.completion_tokens if response.usage else 0
        elapsed = time.perf_counter() - started
        return Generation(text=text, version=version, tokens=tokens, seconds=elapsed)

    async def _ask(self, server: _Server, request: dict[str, Any], adapter: Path | None) -> Any:
        from openai import NotFoundError

        try:
            return await server.client.chat.completions.create(**request)
        except NotFoundError:
            # A vLLM restarted since the adapter was loaded at run time no longer knows it.
            if not (self.runtime_lora and adapter is not None):
                raise
            log.warning("%s does not know %s: loading it", shown_url(server.url), request["model"])
            await self._load(server, request["model"], adapter)
            return await server.client.chat.completions.create(**request)

    async def _on_servers(self, call: Callable[[_Server], Awaitable[T]]) -> T:
        """`call` on the first server that answers: those resting after a failure are skipped
        until their cool-down ends (all of them are tried when every one rests)."""
        now = time.monotonic()
        candidates = [s for s in self._servers if s.resting_until <= now] or self._servers
        for index, server in enumerate(candidates):
            try:
                result = await call(server)
            except Exception as exc:
                if not _failover_error(exc):
                    raise
                server.failed(self.cooldown)
                if index == len(candidates) - 1:
                    raise
                log.warning("%s failed, trying the next server", _cause(server, exc))
                continue
            server.resting_until = 0.0
            if server.url != self.serving_url:
                log.warning("now served by %s", shown_url(server.url))
                self.serving_url = server.url
            return result
        raise AssertionError("unreachable: there is always a server")

    async def _load(self, server: _Server, name: str, adapter: Path) -> None:
        """vLLM's `POST /v1/load_lora_adapter`; an adapter already loaded under `name` is success."""
        from openai import BadRequestError

        try:
            await server.client.post(
                "/load_lora_adapter",
                body={"lora_name": name, "lora_path": str(adapter)},
                cast_to=httpx.Response,
            )
        except BadRequestError as exc:
            if _ALREADY_LOADED not in exc.response.text:
                raise

    async def _load_everywhere(self, name: str, adapter: Path) -> None:
        """Load the adapter into every server (each may be the one that answers next)."""
        failures = []
        for server in self._servers:
            try:
                await self._load(server, name, adapter)
            except Exception as exc:
                failures.append(_cause(server, exc))
        if failures:
            raise SwapFailed(f"{name} not loaded: {'; '.join(failures)}")
        if name not in self._loaded:
            self._loaded.append(name)

    async def _unload_except(self, keep: set[str]) -> None:
        """Free adapters nothing needs any more (vLLM's `POST /v1/unload_lora_adapter`); best effort."""
        from openai import NotFoundError

        for name in [n for n in self._loaded if n not in keep]:
            self._loaded.remove(name)
            for server in self._servers:
                try:
                    await server.client.post(
                        "/unload_lora_adapter", body={"lora_name": name}, cast_to=httpx.Response
                    )
                except NotFoundError:
                    pass  # never loaded there, or a restart forgot it: what we wanted
                except Exception as exc:
                    log.warning("could not unload %s: %s", name, _cause(server, exc))

    async def swap(self, gguf: Path, version: str) -> None:
        """Serve registry version `version`; `gguf` is its adapter directory (with `lora`).

        With runtime loading the adapter goes into every server first and the name switches
        only once all of them have it (SwapFailed otherwise: the old version still serves); the
        version served before stays loaded as the rollback target, older ones are unloaded."""
        if not self.lora:
            log.warning("the openai backend serves whatever its server loaded; swap to %s ignored", version)
            return
        name = await asyncio.to_thread(lora_module_name, version, Path(gguf))
        if self.runtime_lora:
            await self._load_everywhere(name, Path(gguf))
        previous = self.model
        self.model, self.version, self.adapter = name, version, Path(gguf)
        log.info("openai backend now asks for %s", name)
        if self.runtime_lora:
            await self._unload_except({name, previous})

    def queue_length(self) -> int:
        return self._pending

    async def close(self) -> None:
        for server in self._servers:
            await server.client.close()
