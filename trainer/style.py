"""Style metrics: how much a set of replies reads like the owner's. Pure functions, no I/O.

Chinese chat has no word boundaries worth trusting in two-word replies, so n-grams are
characters; faces and stickers are the bracketed placeholders of `pipeline.chatformat`.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

from pipeline.chatformat import PLACEHOLDERS

# `[微笑]`, `[贴贴]`, `[动画表情]`: bracketed, short, no nested brackets or newlines.
_BRACKETED = re.compile(r"\[[^\[\]\n]{1,8}\]")
# Media placeholders say something was sent, not how the owner talks.
_MEDIA = frozenset(PLACEHOLDERS) - {"[动画表情]", "[表情]"}


def faces_and_stickers(text: str) -> list[str]:
    """QQ faces and stickers in a reply, e.g. `[doge]`, `[贴贴]` (images and files excluded)."""
    return [m for m in _BRACKETED.findall(text) if m not in _MEDIA]


def face_sticker_rate(replies: Sequence[str]) -> float:
    """Share of replies with at least one face or sticker."""
    return _share(replies, lambda r: bool(faces_and_stickers(r)))


def no_reply_rate(replies: Sequence[str]) -> float:
    """Share of empty replies (the twin chose silence)."""
    return _share(replies, lambda r: not r.strip())


def reply_length(text: str) -> int:
    """Characters a reader sees; a face or sticker counts as one."""
    return len(_BRACKETED.sub("□", text.strip()))


def length_distance(replies: Sequence[str], reference: Sequence[str]) -> float:
    """Wasserstein-1 distance (in characters) between the two reply-length distributions."""
    a = sorted(reply_length(r) for r in replies)
    b = sorted(reply_length(r) for r in reference)
    if not a or not b:
        return 0.0
    # Integrate |F_a - F_b| over the merged support of the two step functions.
    points = sorted(set(a) | set(b))
    total, ia, ib = 0.0, 0, 0
    for left, right in itertools.pairwise(points):
        while ia < len(a) and a[ia] <= left:
            ia += 1
        while ib < len(b) and b[ib] <= left:
            ib += 1
        total += abs(ia / len(a) - ib / len(b)) * (right - left)
    return total


def _chars(text: str) -> list[str]:
    """Characters, with each face/sticker as one token and whitespace dropped."""
    tokens: list[str] = []
    position = 0
    for match in _BRACKETED.finditer(text):
        tokens += [c for c in text[position : match.start()] if not c.isspace()]
        tokens.append(match.group())
        position = match.end()
    return tokens + [c for c in text[position:] if not c.isspace()]


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Unique character n-grams over all n-grams (higher = more varied)."""
    grams: list[tuple[str, ...]] = []
    for reply in replies:
        chars = _chars(reply)
        grams += [tuple(chars[i : i + n]) for i in range(len(chars) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def top_catchphrases(reference: Sequence[str], k: int = 5, min_share: float = 0.03) -> list[str]:
    """The owner's most widespread 2–4 character phrases (by share of replies using them)."""
    counts: Counter[str] = Counter()
    for reply in reference:
        text = _BRACKETED.sub(" ", reply)
        grams = {
            text[i : i + n]
            for n in (2, 3, 4)
            for i in range(len(text) - n + 1)
            if not any(c.isspace() or c in "，。！？,.!?~…" for c in text[i : i + n])
        }
        counts.update(grams)
    floor = max(2, int(min_share * len(reference)))
    ranked = sorted((g for g, c in counts.items() if c >= floor), key=lambda g: (-counts[g] * len(g), g))
    chosen: list[str] = []
    for gram in ranked:
        # Keep "哈哈哈" rather than also "哈哈": a sub-phrase adds nothing.
        if any(gram in c or c in gram for c in chosen):
            continue
        chosen.append(gram)
        if len(chosen) == k:
            break
    return chosen


def catchphrase_rate(replies: Sequence[str], phrases: Sequence[str]) -> float:
    """Share of replies that use at least one of the phrases."""
    return _share(replies, lambda r: any(p in r for p in phrases)) if phrases else 0.0


def style_metrics(replies: list[str], reference: list[str]) -> dict:
    """Replies vs the owner's real replies: length distance, faces, silence, variety, catchphrases."""
    phrases = top_catchphrases(reference)
    return {
        "n": len(replies),
        "mean_length": _mean([reply_length(r) for r in replies]),
        "reference_mean_length": _mean([reply_length(r) for r in reference]),
        "length_distance": round(length_distance(replies, reference), 4),
        "face_sticker_rate": face_sticker_rate(replies),
        "reference_face_sticker_rate": face_sticker_rate(reference),
        "no_reply_rate": no_reply_rate(replies),
        "reference_no_reply_rate": no_reply_rate(reference),
        "distinct_1": round(distinct_n(replies, 1), 4),
        "distinct_2": round(distinct_n(replies, 2), 4),
        "reference_distinct_1": round(distinct_n(reference, 1), 4),
        "reference_distinct_2": round(distinct_n(reference, 2), 4),
        "catchphrases": phrases,
        "catchphrase_rate": catchphrase_rate(replies, phrases),
        "reference_catchphrase_rate": catchphrase_rate(reference, phrases),
    }


def style_distance(style: dict) -> float:
    """One number for "how far from the owner's style" (0 = indistinguishable on these metrics).

    The reply-length distance relative to the owner's mean reply length, plus the gaps in the
    face/sticker, no-reply and catchphrase rates; every term is a fraction, so they add up.
    """
    length = float(style["length_distance"]) / max(float(style["reference_mean_length"]), 1.0)
    gaps = (
        abs(float(style[key]) - float(style[f"reference_{key}"]))
        for key in ("face_sticker_rate", "no_reply_rate", "catchphrase_rate")
    )
    return round(length + sum(gaps), 4)


def _share(replies: Sequence[str], test) -> float:
    return round(sum(1 for r in replies if test(r)) / len(replies), 4) if replies else 0.0


def _mean(values: list[int]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0
