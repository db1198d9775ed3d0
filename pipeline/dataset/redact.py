"""Personal data → typed placeholders, before anything is written or sent anywhere.

Patterns are deliberately anchored (no digit may touch either end of a match) and the
numeric ones are validated (ID checksum and birth date, Luhn for cards), so dates,
times, prices, counts and chat numbers such as `23333` or `520` survive.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

PHONE = "<手机号>"
LANDLINE = "<电话>"
ID_NUMBER = "<身份证号>"
BANK_CARD = "<银行卡号>"
EMAIL = "<邮箱>"
QQ = "<QQ号>"
URL = "<链接>"
NAME = "<姓名>"

# Counter keys in the report.
KINDS = {
    PHONE: "phone",
    LANDLINE: "landline",
    ID_NUMBER: "id_number",
    BANK_CARD: "bank_card",
    EMAIL: "email",
    QQ: "qq",
    URL: "url",
    NAME: "name",
}

_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A URL ends at whitespace, CJK text or closing punctuation.
_URL_STOP = r"\s\u3000-\u303f\u4e00-\u9fff\uff00-\uffef<>\"'）)】\]"
_URL_RE = re.compile(
    rf"(?:https?://|www\.)[^{_URL_STOP}]+"
    rf"|(?<![\w@.])(?:[A-Za-z0-9-]+\.)+(?:com|cn|net|org|io|me|cc|top|xyz|info|tv)(?:/[^{_URL_STOP}]*)?(?![\w])",
    re.IGNORECASE,
)
_ID_RE = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_CARD_RE = re.compile(r"(?<![\d-])[3-6]\d{3}(?:[ -]?\d{4}){2}[ -]?\d{4}(?:[ -]?\d{1,3})?(?![\d-])")
_PHONE_RE = re.compile(r"(?<![\d+])(?:(?:\+|00)?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?!\d)")
# Landlines need an area-code separator or brackets: a bare 0-prefixed run is too ambiguous.
_LANDLINE_RE = re.compile(r"(?<!\d)(?:0\d{2,3}-|[（(]0\d{2,3}[)）]\s?)[2-9]\d{6,7}(?:-\d{1,4})?(?!\d)")
_QQ_RE = re.compile(
    r"(?P<label>(?:QQ|qq|Qq|扣扣|企鹅)\s*(?:号码|号)?\s*(?:是|为|:|：)?\s*)(?P<num>[1-9]\d{4,11})(?!\d)"
)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_id_number(number: str) -> bool:
    """A mainland resident ID: ISO 7064 check character and a plausible birth date."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    if _ID_CHECK[total % 11] != number[17].upper():
        return False
    year, month, day = int(number[6:10]), int(number[10:12]), int(number[12:14])
    return 1900 <= year <= 2100 and 1 <= month <= 12 and 1 <= day <= 31


def luhn_valid(digits: str) -> bool:
    """The Luhn check that every bank card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str | None:
    digits = re.sub(r"[ -]", "", match.group(0))
    return BANK_CARD if 16 <= len(digits) <= 19 and luhn_valid(digits) else None


def _id(match: re.Match[str]) -> str | None:
    return ID_NUMBER if valid_id_number(match.group(0)) else None


def _qq(match: re.Match[str]) -> str:
    return match.group("label") + QQ


_Rule = tuple[re.Pattern[str], str, Callable[[re.Match[str]], str | None] | None]

# Order matters: e-mails before URLs (their domains look like links), then IDs before
# cards (an 18-digit ID may also pass Luhn), long numbers before phones.
_NUMBER_RULES: tuple[_Rule, ...] = (
    (_ID_RE, ID_NUMBER, _id),
    (_CARD_RE, BANK_CARD, _card),
    (_PHONE_RE, PHONE, None),
    (_LANDLINE_RE, LANDLINE, None),
    (_QQ_RE, QQ, _qq),
)
# Every numeric pattern needs at least five digits, possibly split by separators.
_NUMBERISH = re.compile(r"\d[\d \-()（）]{3,}\d")
# The gates of `redact_found` in one search: "@" (e-mail), "." or "/" (links), numbers.
_ANY_GATE = re.compile(rf"[@./]|{_NUMBERISH.pattern}")


@functools.lru_cache(maxsize=64)
def _longest_first(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({n.strip() for n in names if n.strip()}, key=len, reverse=True))


def redact(text: str, names: Iterable[str] = ()) -> tuple[str, Counter[str]]:
    """Replace personal data in `text` with typed placeholders; returns (text, counts by kind)."""
    text, counts, _ = redact_found(text, names)
    return text, counts


def redact_found(text: str, names: Iterable[str] = ()) -> tuple[str, Counter[str], dict[str, str]]:
    """Like `redact`, also returning what was found (value → placeholder), to catch it again later.

    A QQ number is only recognisable next to "QQ号"; once found, `redact_values` removes its
    bare repetitions elsewhere in the conversation ("好 31415926").
    """
    counts: Counter[str] = Counter()
    found: dict[str, str] = {}
    # Cheap gates first: most chat lines hold no '@', no '.', '/' and no run of five digits.
    if "@" in text:
        text = _sub(_EMAIL_RE, EMAIL, None, text, counts, found)
    if "." in text or "/" in text:
        text = _sub(_URL_RE, URL, None, text, counts, found)
    if _NUMBERISH.search(text) is not None:
        for pattern, placeholder, check in _NUMBER_RULES:
            text = _sub(pattern, placeholder, check, text, counts, found)
    for name in _longest_first(tuple(names)):
        hits = text.count(name)
        if hits:
            text = text.replace(name, NAME)
            counts[KINDS[NAME]] += hits
    return text, counts, found


def needs_redaction(text: str, names: Iterable[str] = ()) -> bool:
    """False when `redact_found` would certainly find nothing: none of its cheap gates opens.

    Lets a caller skip the call (and its counters) for the plain chat lines that make up
    most of a history; whatever passes a gate still goes through every pattern.
    """
    if _ANY_GATE.search(text) is not None:
        return True
    return any(name in text for name in _longest_first(tuple(names))) if names else False


def redact_values(text: str, values: Mapping[str, str]) -> tuple[str, Counter[str]]:
    """Replace known personal values (from `redact_found`) wherever they appear on their own."""
    counts: Counter[str] = Counter()
    for value in sorted(values, key=len, reverse=True):
        if value not in text:
            continue
        pattern = re.compile(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])")
        text, hits = pattern.subn(values[value], text)
        counts[KINDS[values[value]]] += hits
    return text, +counts


def _sub(
    pattern: re.Pattern[str],
    placeholder: str,
    check: Callable[[re.Match[str]], str | None] | None,
    text: str,
    counts: Counter[str],
    found: dict[str, str],
) -> str:
    def replace(match: re.Match[str]) -> str:
        out = placeholder if check is None else check(match)
        if out is None:
            return match.group(0)
        counts[KINDS[placeholder]] += 1
        value = match.group("num") if placeholder == QQ else match.group(0)
        found[value] = placeholder
        return out

    return pattern.sub(replace, text)


def has_url(text: str) -> bool:
    """True when the text contains something that looks like a link."""
    return _URL_RE.search(text) is not None


def strip_urls(text: str) -> str:
    """The text with links removed (to judge whether a message is only a link)."""
    return _URL_RE.sub("", text)
