"""Talk to a GGUF model with exactly the prompt the bot builds (`twin chat`).

llama.cpp is not thread-safe and two threads on two busy cores collapse, so one
dedicated worker thread loads the model and runs every generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.chatformat import (
    DEFAULT_PERSONA,
    PRIVATE,
    Turn,
    clean_model_output,
    join_burst,
    render_chat_template,
    system_prompt,
    to_messages,
)
from pipeline.errors import InputError
from pipeline.llama_prompt import SegmentCache, prompt_token_ids


class ChatModel:
    """A GGUF loaded in llama.cpp on its own thread; `reply` answers a conversation so far."""

    def __init__(
        self,
        gguf: str | Path,
        *,
        persona: str = DEFAULT_PERSONA,
        system: str | None = None,
        n_threads: int = 2,
        n_ctx: int = 2048,
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise InputError(self.gguf, "no such GGUF model file")
        self.system = system if system is not None else system_prompt(persona)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twin-chat")
        self._llm: Any = None
        self._template = self._bos = self._eos = ""
        self._segments: SegmentCache = {}
        self._pool.submit(self._load, n_threads, n_ctx).result()

    def _load(self, n_threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        try:
            llm = Llama(
                model_path=str(self.gguf),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                seed=self.seed,
                verbose=False,
            )
        except ValueError as exc:
            raise InputError(self.gguf, f"llama.cpp cannot load this file ({exc})") from None
        self._template = str(llm.metadata.get("tokenizer.chat_template", ""))
        if not self._template:
            llm.close()
            raise InputError(self.gguf, "the GGUF has no tokenizer.chat_template")
        self._bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "ignore")
        self._eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "ignore")
        self._llm = llm

    def messages(self, history: Sequence[Turn], chat_type: str = PRIVATE) -> list[dict[str, str]]:
        """The bot's prompt: the system prompt then the turns, via the shared chat format."""
        return to_messages(history, chat_type, system=self.system)

    def prompt(self, messages: Sequence[dict[str, str]]) -> str:
        return render_chat_template(self._template, messages, bos_token=self._bos, eos_token=self._eos)

    def prompt_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """`prompt` as the bot tokenises it: chat text never becomes a special token."""
        return self._pool.submit(self._prompt_tokens, list(messages)).result()

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return prompt_token_ids(
            self._llm, self._template, messages, bos=self._bos, eos=self._eos, cache=self._segments
        )

    def generate(self, messages: Sequence[dict[str, str]]) -> str:
        """The reply to a `messages` list, cleaned as the bot cleans it (`clean_model_output`)."""
        return self._pool.submit(self._generate, list(messages)).result()

    def _generate(self, messages: list[dict[str, str]]) -> str:
        out = self._llm.create_completion(
            self._prompt_tokens(messages),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            stop=[self._eos] if self._eos else None,
        )
        return clean_model_output(out["choices"][0]["text"])

    def reply(self, user_messages: Sequence[str], history: Sequence[Turn] = ()) -> str:
        """Answer a friend's burst of messages (one per line) after an optional history."""
        turns = [*history, Turn(role="user", text=join_burst(user_messages))]
        return self.generate(self.messages(turns))

    def close(self) -> None:
        def unload() -> None:
            if self._llm is not None:
                self._llm.close()
                self._llm = None

        self._pool.submit(unload).result()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_chat_model(model: str | Path, quant: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A `.gguf`, a model directory or a registry → the GGUF to load and its manifest."""
    from pipeline.registry import resolve_model

    try:
        resolved = resolve_model(model, quant)
    except FileNotFoundError as exc:
        raise InputError(model, str(exc).split(": ", 1)[-1]) from None
    return resolved.gguf, resolved.manifest
