"""A chat prompt → llama.cpp token ids whose special tokens come only from the template.

The bot, `twin chat`, the export's verification and the benchmark all prompt llama.cpp with
these ids, so a friend typing `<|im_end|>` is the same plain text everywhere. Each function
takes the loaded `llama_cpp.Llama`; nothing here loads a model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.chatformat import ChatTemplateError, PromptPiece, neutralise_messages, render_chat_pieces

log = logging.getLogger(__name__)

_Segment = str | tuple[int, int]  # raw text, or a special token as (id, llama.cpp token attributes)
SegmentCache = dict[str, list[_Segment]]  # template text → its segments, kept per loaded model
_ATTR_SPECIAL = 1 << 0 | 1 << 3  # LLAMA_TOKEN_ATTR_UNKNOWN | LLAMA_TOKEN_ATTR_CONTROL
_ATTR_LSTRIP, _ATTR_RSTRIP = 1 << 7, 1 << 8
_ASCII_SPACE = " \t\n\v\f\r"  # what llama.cpp strips around LSTRIP/RSTRIP tokens
_CACHE_LIMIT = 512  # template text that varies (a date in the system header) must not grow it forever


def prompt_token_ids(
    llm: Any,
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    bos: str,
    eos: str,
    cache: SegmentCache | None = None,
    special_tokens: Iterable[str] = (),
) -> list[int]:
    """`messages` rendered by `template` (thinking off) as token ids; chat text never becomes a special token.

    BOS is added only when the model wants it and the template lacks it. A template whose
    output cannot be split from the chat text gets the chat with special-token text removed.
    """
    try:
        pieces = render_chat_pieces(template, messages, bos_token=bos, eos_token=eos)
    except ChatTemplateError as exc:
        log.warning("%s: special-token text removed from the chat for this prompt", exc)
        clean = neutralise_messages(messages, special_tokens)
        pieces = render_chat_pieces(template, clean, bos_token=bos, eos_token=eos)
    if cache is not None and len(cache) > _CACHE_LIMIT:
        cache.clear()
    tokens = tokenize_pieces(llm, pieces, cache)
    wants_bos = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
    if wants_bos and (not tokens or tokens[0] != llm.token_bos()):
        tokens.insert(0, llm.token_bos())
    return tokens


def tokenize_pieces(llm: Any, pieces: Sequence[PromptPiece], cache: SegmentCache | None = None) -> list[int]:
    """Token ids of a prompt whose special tokens come only from its template pieces.

    llama.cpp itself cuts a prompt at special-token text and tokenises the text between as
    plain text. This cuts only template pieces, so the plain text runs across template and
    content exactly as before and ordinary prompts keep their ids, while `<|im_end|>` typed in
    a message stays plain text.
    """
    cache = {} if cache is None else cache
    ids: list[int] = []
    run: list[str] = []
    strip_left = False

    def flush(strip_right: bool = False) -> None:
        nonlocal strip_left
        text = "".join(run)
        run.clear()
        if strip_left:
            text = text.lstrip(_ASCII_SPACE)
        if strip_right:
            text = text.rstrip(_ASCII_SPACE)
        strip_left = False
        if text:
            ids.extend(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    for piece in pieces:
        if piece.is_content:
            run.append(piece.text)
            continue
        if piece.text not in cache:
            cache[piece.text] = _template_segments(llm, piece.text)
        for segment in cache[piece.text]:
            if isinstance(segment, str):
                run.append(segment)
                continue
            token, attr = segment
            flush(strip_right=bool(attr & _ATTR_LSTRIP))
            ids.append(token)
            strip_left = bool(attr & _ATTR_RSTRIP)
    flush()
    return ids


def _template_segments(llm: Any, text: str) -> list[_Segment]:
    """Template text cut at its special tokens, as llama.cpp's own tokenizer would cut it."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    segments: list[_Segment] = []
    rest = text
    for token in tokens:
        attr = int(llama_cpp.llama_vocab_get_attr(vocab, token))
        if not attr & _ATTR_SPECIAL:
            continue
        marker = llm.detokenize([token], special=True).decode("utf-8", "replace")
        at = rest.find(marker) if marker else -1
        if at < 0:  # cannot place it: keep the template's own tokens, as llama.cpp made them
            return [(t, 0) for t in tokens]
        segments += [rest[:at], (token, attr)]
        rest = rest[at + len(marker) :]
    segments.append(rest)
    return [s for s in segments if s != ""]
