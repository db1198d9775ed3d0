"""Personal data → typed placeholders, before anything is written or sent anywhere.

Patterns are deliberately anchored (no digit may touch either end of a match), and the
numeric ones are either validated (ID checksum and birth date, Luhn for cards) or need a
label ("QQ号", "微信", "手机"), so dates, times, prices, counts, version numbers and chat
numbers such as `23333` or `520` survive. Full-width digits and letters are folded to ASCII
for matching only: what gets replaced is the original text.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

PHONE = "<手机号>"
LANDLINE = "<电话>"
ID_NUMBER = "<身份证号>"
BANK_CARD = "<银行卡号>"
EMAIL = "<邮箱>"
QQ = "<QQ号>"
WECHAT = "<微信号>"
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
    WECHAT: "wechat",
    URL: "url",
    NAME: "name",
}

# Full-width digits, letters, "+", "-", "." and the ideographic space, one character to one
# character, so that a match in the folded text has the same span in the original.
_WIDE = (0xFF0B, 0xFF0D, 0xFF0E, *range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))
_FOLD = str.maketrans({c: c - 0xFEE0 for c in _WIDE} | {0x3000: 0x20})
_FULLWIDTH = re.compile("[\uff0b\uff0d\uff0e\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\u3000]")

_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A URL ends at whitespace, CJK text or closing punctuation.
_URL_STOP = r"\s\u3000-\u303f\u4e00-\u9fff\uff00-\uffef<>\"'）)】\]"
_URL_RE = re.compile(
    rf"(?:https?://|www\.)[^{_URL_STOP}]+"
    rf"|(?<![\w@.])(?:[A-Za-z0-9-]+\.)+(?:com|cn|net|org|io|me|cc|top|xyz|info|tv)(?:/[^{_URL_STOP}]*)?(?![\w])",
    re.IGNORECASE,
)

# The numeric patterns run on folded text, hence [0-9]: `\d` would also take other scripts.
# IDs: 18 characters, or 6-4-4-4 / 6-8-4 groups split by spaces or dashes.
_ID_RE = re.compile(r"(?<![0-9A-Za-z])[0-9]{6}(?:[ -]?[0-9]{4}){2}[ -]?[0-9]{3}[0-9Xx](?![0-9A-Za-z])")
_CARD_RE = re.compile(
    r"(?<![0-9-])[3-6][0-9]{3}(?:[ -]?[0-9]{4}){2}[ -]?[0-9]{4}(?:[ -]?[0-9]{1,3})?(?![0-9-])"
)
# Mobiles: 11 digits, 3-4-4 with spaces or dashes, or with dots ("138.0013.8000"), after an
# optional +86 / 0086 / (+86).
_PHONE_RE = re.compile(
    r"(?<![0-9+])(?<![0-9]\.)(?:(?:\+|00)?86[-. ]?|[（(](?:\+|00)?86[)）] ?)?"
    r"1[3-9][0-9](?:(?:[- ]?[0-9]{4}){2}|\.[0-9]{4}\.[0-9]{4})(?![0-9]|\.[0-9])"
)
_LABEL_SEP = r"\s*(?:是|为|:|：)?\s*"
# After a phone label any grouping goes ("手机：1380 013 8000", "tel 138-00-138-000").
_PHONE_LABELLED_RE = re.compile(
    r"(?:手机|电话|号码|联系方式|(?<![A-Za-z])(?i:tel|phone|mobile|cell)(?![A-Za-z]))(?:号码|号)?"
    + _LABEL_SEP
    + r"(?P<num>(?:\+?86[ .-]?)?1[3-9](?:[ .-]?[0-9]){9})(?![0-9])"
)
# Landlines need an area-code separator or brackets: a bare 0-prefixed run is too ambiguous.
_LANDLINE_RE = re.compile(
    r"(?<![0-9])(?:0[0-9]{2,3}-|[（(]0[0-9]{2,3}[)）] ?)"
    r"[2-9](?:[0-9]{6,7}|[0-9]{2,3}[- ][0-9]{4})(?:-[0-9]{1,4})?(?![0-9])"
)
_LANDLINE_LABELLED_RE = re.compile(
    r"(?:座机|固话|电话|(?<![A-Za-z])(?i:tel)(?![A-Za-z]))(?:号码|号)?"
    + _LABEL_SEP
    + r"(?P<num>0[1-9][0-9]{1,2}[ .-]?[2-9][0-9]{2,3}[ .-]?[0-9]{4})(?![0-9])"
)
# A QQ number (5-12 digits) is only recognisable after a label, whole or in groups of up to
# four digits ("1234 5678 9", "123-456-789"); the label stays, the number goes.
_QQ_NUMBER = r"[1-9][0-9]{4,11}(?![0-9])|[1-9][0-9]{0,3}(?:[ -][0-9]{1,4}){1,5}(?![0-9])"
_QQ_RE = re.compile(
    r"(?:(?i:qq)|扣扣|企鹅|(?<![A-Za-z0-9])[Qq](?=号|\s*[:：])|加我?[Qq])(?:号码|号)?"
    + _LABEL_SEP
    + rf"(?P<num>{_QQ_NUMBER})"
)
# Rendered mentions of people without a known name: "@123456789", or the QQ NT uid that a
# stored mention carries instead of the number ("@u_3nMb9Xq…": opaque, but the same person always).
_MENTION_RE = re.compile(r"@(?P<num>[1-9][0-9]{4,11}(?![0-9])|u_[A-Za-z0-9_-]{8,}(?![A-Za-z0-9_-]))")
# "加我 123456789" in a QQ chat is a QQ number; "加我 100000 分" is not.
_ADD_ME_RE = re.compile(
    r"加我(?:好友)?\s*[:：]?\s*(?P<num>[1-9][0-9]{5,11})(?![0-9])"
    r"(?!\s*[元块分个人万千百次条点年月日号岁秒wWkK%])"
)
# WeChat ids: 6-20 characters, a letter first, after a label. A strong context ("加微信",
# "微信号", "：", "是") takes any id; after a bare label ("微信 …", "vx …") the id needs a
# digit, "_" or "-", so that "微信 really nice" survives. The labels are plain literals (the
# cheap gate, and `re` scans for their first characters); their context is checked in
# `_wechat`.
_WECHAT_LABELS = (
    "微信|威信|薇信|v信|V信|vx|Vx|vX|VX|wx|Wx|wX|WX|weixin|Weixin|WeiXin|WEIXIN|wechat|Wechat|WeChat|WECHAT"
)
_WECHAT_RE = re.compile(
    rf"(?P<label>{_WECHAT_LABELS}|v|V)"
    r"(?P<hao>号码?|\s*(?:id|ID)(?![A-Za-z0-9]))?\s*(?P<sep>[:：]|是|为)?\s*"
    r"(?P<num>[A-Za-z][A-Za-z0-9_-]{5,19}(?![A-Za-z0-9_-])|[1-9][0-9]{4,11}(?![0-9]))"
)
_ADD_BEFORE = re.compile(r"加(?:我的?|个|下|一下)?\s*$")
_ALNUM = re.compile("[A-Za-z0-9]")
# WeChat's generated ids are unmistakable without a label.
_WXID_RE = re.compile(r"(?<![A-Za-z0-9_])wxid_[A-Za-z0-9]{6,24}(?![A-Za-z0-9_])")

_SEPARATORS = re.compile(r"[ .-]")
_DATE_LIKE = re.compile(r"(?:19|20)[0-9]{2}[ -][0-9]{1,2}(?:[ -][0-9]{1,2})?")
# Numbers that "加我 …" may well be followed by without meaning an account.
_CHAT_NUMBER = re.compile(r"([0-9])\1+|2333+|(?:520|1314)+|(?:19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:[0-3][0-9])?")
_QQ_MAIL_DOMAINS = ("qq.com", "vip.qq.com")

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


def _id(match: re.Match[str], value: str) -> bool:
    return valid_id_number(_SEPARATORS.sub("", value))


def _card(match: re.Match[str], value: str) -> bool:
    digits = _SEPARATORS.sub("", value)
    return 16 <= len(digits) <= 19 and luhn_valid(digits)


def _qq(match: re.Match[str], value: str) -> bool:
    return 5 <= len(_SEPARATORS.sub("", value)) <= 12 and _DATE_LIKE.fullmatch(value) is None


def _not_chat_number(match: re.Match[str], value: str) -> bool:
    return _CHAT_NUMBER.fullmatch(value) is None


def _wechat(match: re.Match[str], value: str) -> bool:
    folded, label, start = match.string, match.group("label"), match.start()
    if label.isascii():
        # "vx" and "wx" must stand alone: not the middle of "wxid_…", "devx", "Nov 2024".
        before, after = folded[start - 1 : start], folded[match.end("label")]
        if _ALNUM.match(before) or _ALNUM.match(after):
            return False
    added = _ADD_BEFORE.search(folded, max(0, start - 6), start) is not None
    if label in ("v", "V") and not added:
        return False  # a lone "v" is a label only in "加v" / "加我V"
    if value.isdigit():
        return match.group("hao") is not None  # a number is a WeChat id only after "微信号"
    if added or match.group("hao") or match.group("sep"):
        return True
    return any(c.isdigit() or c in "_-" for c in value)


@dataclass(frozen=True, slots=True)
class _Rule:
    """A pattern and its placeholder; `accept` vets each (match, value), `gate` is tried first.

    The replaced span is the group `num` when the pattern has one: the label stays.
    """

    pattern: re.Pattern[str]
    placeholder: str
    accept: Callable[[re.Match[str], str], bool] | None = None
    gate: re.Pattern[str] | None = None


# Order matters: e-mails before URLs (their domains look like links), then IDs before
# cards (an 18-digit ID may also pass Luhn), long numbers before phones, phones before QQ.
_EMAIL_RULE = _Rule(_EMAIL_RE, EMAIL)
_URL_RULE = _Rule(_URL_RE, URL)
# At least ten digits each (a landline's shortest), ...
_LONG_RULES = (
    _Rule(_ID_RE, ID_NUMBER, _id),
    _Rule(_CARD_RE, BANK_CARD, _card),
    _Rule(_PHONE_RE, PHONE),
    _Rule(_PHONE_LABELLED_RE, PHONE, gate=re.compile("手机|电话|号码|联系方式|t|T|p|P|m|M|c|C")),
    _Rule(_LANDLINE_RE, LANDLINE),
    _Rule(_LANDLINE_LABELLED_RE, LANDLINE, gate=re.compile("座机|固话|电话|t|T")),
)
# ... and at least five, after a label.
_SHORT_RULES = (
    _Rule(_QQ_RE, QQ, _qq, gate=re.compile("q|Q|扣扣|企鹅")),
    _MENTION_RULE := _Rule(_MENTION_RE, QQ, gate=re.compile("@")),
    _Rule(_ADD_ME_RE, QQ, _not_chat_number, gate=re.compile("加我")),
)
_WECHAT_RULES = (_Rule(_WECHAT_RE, WECHAT, _wechat), _Rule(_WXID_RE, WECHAT, gate=re.compile("wxid_")))

# Every numeric pattern needs at least five digits, possibly split by separators; `\d` also
# takes full-width digits, so this gate opens before any folding.
_NUMBERISH = re.compile(r"\d[\d \-.()（）\u3000\uff0d\uff0e]{3,}\d")
# Ten digits with separators, in the folded text: dates, prices and counts stop here.
_LONG_NUMBER = re.compile(r"\d(?:[ \-.()（）]{0,2}\d){9}")
# Every WeChat label holds one of these. Literal alternatives, so that `re` scans for their
# first characters (a character class first would make it try every position).
_WECHAT_GATE = re.compile(f"{_WECHAT_LABELS}|v|V|ｖ|Ｖ|ｗｘ|ＷＸ")  # "v" alone: "加V", "加我 v"


@functools.lru_cache(maxsize=64)
def _longest_first(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({n.strip() for n in names if n.strip()}, key=len, reverse=True))


def redact(text: str, names: Iterable[str] = ()) -> tuple[str, Counter[str]]:
    """Replace personal data in `text` with typed placeholders; returns (text, counts by kind)."""
    text, counts, _ = redact_found(text, names)
    return text, counts


def redact_found(text: str, names: Iterable[str] = ()) -> tuple[str, Counter[str], dict[str, str]]:
    """Like `redact`, also returning what was found (value → placeholder), to catch it again later.

    A QQ number or WeChat id is only recognisable next to a label ("QQ号", "微信"); once
    found, `redact_values` removes its bare repetitions elsewhere in the conversation
    ("好 31415926"). QQ numbers are kept as found and as plain digits.
    """
    counts: Counter[str] = Counter()
    found: dict[str, str] = {}
    # Cheap gates first: most chat lines hold no '@', no '.', '/', no run of five digits
    # and no WeChat label.
    if "@" in text:
        text, _ = _apply(_EMAIL_RULE, text, text, counts, found)
    if "." in text or "/" in text:
        text, _ = _apply(_URL_RULE, text, text, counts, found)
    numbers = _NUMBERISH.search(text) is not None
    wechat = _WECHAT_GATE.search(text) is not None
    uid_mention = "@u_" in text  # a mention by QQ NT uid holds no run of digits
    if numbers or wechat or uid_mention:
        folded = _fold(text)
        rules: tuple[_Rule, ...] = ()
        if numbers:
            rules = _LONG_RULES + _SHORT_RULES if _LONG_NUMBER.search(folded) else _SHORT_RULES
        elif uid_mention:
            rules = (_MENTION_RULE,)
        if wechat:
            rules += _WECHAT_RULES
        for rule in rules:
            text, folded = _apply(rule, text, folded, counts, found)
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
    if "@" in text or "." in text or "/" in text:  # e-mails, mentions, links
        return True
    if _NUMBERISH.search(text) is not None or _WECHAT_GATE.search(text) is not None:
        return True
    return any(name in text for name in _longest_first(tuple(names))) if names else False


def redact_values(text: str, values: Mapping[str, str]) -> tuple[str, Counter[str]]:
    """Replace known personal values (from `redact_found`) wherever they appear on their own.

    Full-width forms of a value count as the value.
    """
    counts: Counter[str] = Counter()
    folded = _fold(text)
    for value in sorted(values, key=len, reverse=True):
        if value in folded:
            rule = _Rule(_bare(value), values[value])
            text, folded = _apply(rule, text, folded, counts, {})
    return text, +counts


@functools.lru_cache(maxsize=4096)
def _bare(value: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])")


def _fold(text: str) -> str:
    return text.translate(_FOLD) if _FULLWIDTH.search(text) is not None else text


def _apply(
    rule: _Rule, text: str, folded: str, counts: Counter[str], found: dict[str, str]
) -> tuple[str, str]:
    """Replace `rule`'s matches in `folded` at the same spans in `text`; returns both, updated."""
    if rule.gate is not None and rule.gate.search(folded) is None:
        return text, folded
    first = rule.pattern.search(folded)
    if first is None:  # the common case, kept cheap
        return text, folded
    group = "num" if "num" in rule.pattern.groupindex else 0
    unfolded = folded is text  # one string to rebuild, not two
    out: list[str] = []
    out_folded: list[str] = []
    last = 0
    for match in itertools.chain((first,), rule.pattern.finditer(folded, first.end())):
        start, end = match.span(group)
        value = folded[start:end]
        if rule.accept is not None and not rule.accept(match, value):
            continue
        out += (text[last:start], rule.placeholder)
        if not unfolded:
            out_folded += (folded[last:start], rule.placeholder)
        last = end
        counts[KINDS[rule.placeholder]] += 1
        _remember(value, rule.placeholder, found)
    if not out:
        return text, folded
    out.append(text[last:])
    text = "".join(out)
    if unfolded:
        return text, text
    out_folded.append(folded[last:])
    return text, "".join(out_folded)


def _remember(value: str, placeholder: str, found: dict[str, str]) -> None:
    found[value] = placeholder
    if placeholder == QQ:
        found[_SEPARATORS.sub("", value)] = QQ
    elif placeholder == EMAIL:
        # 12345678@qq.com carries the QQ number, which may be written bare later.
        local, _, domain = value.partition("@")
        if domain.lower() in _QQ_MAIL_DOMAINS and local.isdigit() and 5 <= len(local) <= 12:
            found[local] = QQ


def has_url(text: str) -> bool:
    """True when the text contains something that looks like a link."""
    return _URL_RE.search(text) is not None


def strip_urls(text: str) -> str:
    """The text with links removed (to judge whether a message is only a link)."""
    return _URL_RE.sub("", text)
