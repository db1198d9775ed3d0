"""The one chat format shared by the dataset builder and the live bot.

How message elements render as text (placeholders), how turns are labelled, the
system prompt, how a conversation becomes a `messages` list, how replies are cleaned and
split into bubbles, and how a chat template is rendered with thinking disabled, as text or
as pieces that keep chat text apart from template control (chat text is data, never
control). The model must see live chats exactly as it saw its training data, so nothing
else re-implements any of this. Pure functions, standard library plus jinja2 only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple, Protocol

# Placeholders for element kinds that carry no text of their own (docs/ntqq.md lists them).
IMAGE = "[图片]"
ANIMATED_STICKER = "[动画表情]"
VOICE = "[语音]"
VIDEO = "[视频]"
FILE = "[文件]"
FORWARD = "[聊天记录]"
CARD = "[卡片]"
UNKNOWN_FACE = "[表情]"

PLACEHOLDERS = (IMAGE, ANIMATED_STICKER, VOICE, VIDEO, FILE, FORWARD, CARD, UNKNOWN_FACE)

# QQ system face ids → names, for bodies (or OneBot segments) that carry only the id.
FACE_NAMES: dict[int, str] = {
    0: "惊讶",
    1: "撇嘴",
    2: "色",
    3: "发呆",
    4: "得意",
    5: "流泪",
    6: "害羞",
    7: "闭嘴",
    8: "睡",
    9: "大哭",
    10: "尴尬",
    11: "发怒",
    12: "调皮",
    13: "呲牙",
    14: "微笑",
    15: "难过",
    16: "酷",
    18: "抓狂",
    19: "吐",
    20: "偷笑",
    21: "可爱",
    22: "白眼",
    23: "傲慢",
    24: "饥饿",
    25: "困",
    26: "惊恐",
    27: "流汗",
    28: "憨笑",
    29: "悠闲",
    30: "奋斗",
    31: "咒骂",
    32: "疑问",
    33: "嘘",
    34: "晕",
    35: "折磨",
    36: "衰",
    37: "骷髅",
    38: "敲打",
    39: "再见",
    41: "发抖",
    42: "爱情",
    43: "跳跳",
    46: "猪头",
    49: "拥抱",
    53: "蛋糕",
    54: "闪电",
    55: "炸弹",
    56: "刀",
    57: "足球",
    59: "便便",
    60: "咖啡",
    61: "饭",
    63: "玫瑰",
    64: "凋谢",
    66: "爱心",
    67: "心碎",
    69: "礼物",
    74: "太阳",
    75: "月亮",
    76: "赞",
    77: "踩",
    78: "握手",
    79: "胜利",
    85: "飞吻",
    86: "怄火",
    89: "西瓜",
    96: "冷汗",
    97: "擦汗",
    98: "抠鼻",
    99: "鼓掌",
    100: "糗大了",
    101: "坏笑",
    102: "左哼哼",
    103: "右哼哼",
    104: "哈欠",
    105: "鄙视",
    106: "委屈",
    107: "快哭了",
    108: "阴险",
    109: "左亲亲",
    110: "吓",
    111: "可怜",
    112: "菜刀",
    113: "啤酒",
    114: "篮球",
    115: "乒乓",
    116: "示爱",
    117: "瓢虫",
    118: "抱拳",
    119: "勾引",
    120: "拳头",
    121: "差劲",
    122: "爱你",
    123: "NO",
    124: "OK",
    125: "转圈",
    126: "磕头",
    127: "回头",
    128: "跳绳",
    129: "挥手",
    130: "激动",
    131: "街舞",
    132: "献吻",
    133: "左太极",
    134: "右太极",
    136: "双喜",
    137: "鞭炮",
    138: "灯笼",
    140: "K歌",
    144: "喝彩",
    145: "祈祷",
    146: "爆筋",
    147: "棒棒糖",
    148: "喝奶",
    151: "飞机",
    158: "钞票",
    168: "药",
    169: "手枪",
    171: "茶",
    172: "眨眼睛",
    173: "泪奔",
    174: "无奈",
    175: "卖萌",
    176: "小纠结",
    177: "喷血",
    178: "斜眼笑",
    179: "doge",
    180: "惊喜",
    181: "骚扰",
    182: "笑哭",
    183: "我最美",
    184: "河蟹",
    185: "羊驼",
    187: "幽灵",
    188: "蛋",
    190: "菊花",
    192: "红包",
    193: "大笑",
    194: "不开心",
    197: "冷漠",
    198: "呃",
    199: "好棒",
    200: "拜托",
    201: "点赞",
    202: "无聊",
    203: "托脸",
    204: "吃",
    205: "送花",
    206: "害怕",
    207: "花痴",
    208: "小样儿",
    210: "飙泪",
    211: "我不看",
    212: "托腮",
    214: "啵啵",
    215: "糊脸",
    216: "拍头",
    217: "扯一扯",
    218: "舔一舔",
    219: "蹭一蹭",
    220: "拽炸天",
    221: "顶呱呱",
    222: "抱抱",
    223: "暴击",
    224: "开枪",
    225: "撩一撩",
    226: "拍桌",
    227: "拍手",
    228: "恭喜",
    229: "干杯",
    230: "嘲讽",
    231: "哼",
    232: "佛系",
    233: "掐一掐",
    234: "惊呆",
    235: "颤抖",
    236: "啃头",
    237: "偷看",
    238: "扇脸",
    239: "原谅",
    240: "喷脸",
    241: "生日快乐",
    242: "头撞击",
    243: "甩头",
    244: "扔狗",
    245: "加油必胜",
    246: "加油抱抱",
    247: "口罩护体",
    260: "搬砖中",
    261: "忙到飞起",
    262: "脑阔疼",
    263: "沧桑",
    264: "捂脸",
    265: "辣眼睛",
    266: "哦哟",
    267: "头秃",
    268: "问号脸",
    269: "暗中观察",
    270: "emm",
    271: "吃瓜",
    272: "呵呵哒",
    273: "我酸了",
    274: "太南了",
    277: "汪汪",
    278: "汗",
    281: "无眼笑",
    282: "敬礼",
    283: "狂笑",
    284: "面无表情",
    285: "摸鱼",
    286: "魔鬼笑",
    287: "哦",
    288: "请",
    289: "睁眼",
    290: "敲开心",
    291: "震惊",
    292: "让我康康",
    293: "摸锦鲤",
    294: "期待",
    295: "拿到红包",
    297: "拜谢",
    298: "元宝",
    299: "牛啊",
    300: "胖三斤",
    301: "好闪",
    302: "左拜年",
    303: "右拜年",
    305: "右亲亲",
    306: "牛气冲天",
    307: "喵喵",
    311: "打call",
    312: "变形",
    314: "仔细分析",
    317: "菜汪",
    318: "崇拜",
    319: "比心",
    320: "庆祝",
    323: "嫌弃",
    324: "吃糖",
    325: "惊吓",
    326: "生气",
    332: "举牌牌",
    333: "烟花",
    334: "虎虎生威",
    336: "豹富",
    337: "花朵脸",
    338: "我想开了",
    339: "舔屏",
    341: "打招呼",
    342: "酸Q",
    343: "我方了",
    344: "大怨种",
    345: "红包多多",
    346: "你真棒棒",
    347: "大展宏兔",
    349: "坚强",
    350: "贴贴",
    351: "敲敲",
    352: "咦",
    353: "拜托",
    354: "尊嘟假嘟",
    355: "耶",
    356: "666",
    357: "裂开",
    392: "龙年快乐",
    393: "新年中龙",
    394: "新年大龙",
    395: "略略略",
}

ElementKind = Literal[
    "text", "face", "sticker", "image", "voice", "video", "file", "at", "reply", "forward", "card"
]


@dataclass(slots=True, frozen=True)
class Element:
    """One message element, as decoded from a stored body or a live OneBot segment.

    `text` holds what the element itself says, when it says anything: the text, the
    @-name, the face text (`/微笑`), the sticker text (`[贴贴]`), an image summary
    (`[动画表情]`) or a voice transcript. `ref` holds an id: face id, @ target, quoted id.
    """

    kind: ElementKind
    text: str = ""
    ref: str = ""


def face_placeholder(face_id: int | str | None, face_text: str = "") -> str:
    """`/微笑` or id 14 → `[微笑]`; unknown ids → `[表情]`."""
    name = face_text.strip().lstrip("/").strip("[]")
    if not name and face_id not in (None, ""):
        try:
            name = FACE_NAMES.get(int(face_id), "")
        except (TypeError, ValueError):
            name = ""
    return f"[{name}]" if name else UNKNOWN_FACE


# The longest `[名字]` that can stand for a face or a market sticker in a reply (QQ's names are short).
MAX_STICKER_NAME_CHARS = 16


def sticker_name(text: str) -> str:
    """A market sticker's name: its summary without brackets (`[贴贴]` → `贴贴`; "" when it has none)."""
    return text.strip().strip("[]").strip()


def sticker_placeholder(text: str) -> str:
    """A market sticker renders as its own text, always bracketed: `贴贴` → `[贴贴]`."""
    name = sticker_name(text)
    return f"[{name}]" if name else ANIMATED_STICKER


def at_placeholder(name: str, target: str = "") -> str:
    """An @-mention renders as `@name` (falling back to the target's number)."""
    name = name.strip().lstrip("@") or target
    return f"@{name}"


def render_element(element: Element) -> str:
    """The text a person would read for one element (replies add nothing)."""
    kind = element.kind
    if kind == "text":
        return element.text
    if kind == "at":
        return at_placeholder(element.text, element.ref)
    if kind == "face":
        return face_placeholder(element.ref, element.text)
    if kind == "sticker":
        return sticker_placeholder(element.text)
    if kind == "image":
        return ANIMATED_STICKER if element.text.strip() == ANIMATED_STICKER else IMAGE
    if kind == "voice":
        return element.text.strip() or VOICE
    if kind == "video":
        return VIDEO
    if kind == "file":
        return FILE
    if kind == "forward":
        return FORWARD
    if kind == "card":
        return CARD
    return ""  # reply: the quoted text belongs to the quoted message


def element_kind_label(element: Element) -> str:
    """The `kinds` entry for an element; an animated-sticker image counts as a sticker."""
    if element.kind == "image" and element.text.strip() == ANIMATED_STICKER:
        return "sticker"
    return element.kind


def render_elements(elements: Iterable[Element]) -> tuple[str, list[str], str | None]:
    """Concatenate elements in order → (text, kinds present in first-seen order, reply ref)."""
    parts: list[str] = []
    kinds: list[str] = []
    reply_ref: str | None = None
    for element in elements:
        parts.append(render_element(element))
        label = element_kind_label(element)
        if label not in kinds:
            kinds.append(label)
        if element.kind == "reply" and reply_ref is None and element.ref:
            reply_ref = element.ref
    return "".join(parts).strip(), kinds, reply_ref


def is_placeholder_only(text: str) -> bool:
    """True when the text is nothing but media placeholders (e.g. a lone `[图片]`)."""
    rest = text
    for placeholder in PLACEHOLDERS:
        rest = rest.replace(placeholder, "")
    return not rest.strip()


# ---------------------------------------------------------------- prompts and turns

DEFAULT_PERSONA = "我"

SYSTEM_PROMPT_TEMPLATE = (
    "你是{persona}，正在QQ上和朋友聊天。像{persona}平时那样说话：用自己的口头禅、表情和语气，"
    "回复简短自然，可以分几条发；不想回的时候就什么都不说。"
)

# Passed to every chat template: Qwen3 and its kin must not emit a thinking block.
CHAT_TEMPLATE_KWARGS: dict[str, object] = {"enable_thinking": False}

SPEAKER_SEPARATOR = "："


# What a prompt may know beyond its turns, each under its own heading after the persona.
MEMORY_HEADING = "你记得的关于这个聊天的事："
EXAMPLES_HEADING = "你以前在类似的时候是这样回的："


@dataclass(slots=True, frozen=True)
class ChatContext:
    """What the prompt of one chat knows besides its turns: the memory of that chat (rendered,
    bounded) and the owner's own past replies to similar messages. Built from that chat's
    history only; the dataset and the bot pass the same value to `system_prompt`."""

    memory: str = ""
    examples: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.memory.strip() or self.examples)


def system_prompt(persona: str = DEFAULT_PERSONA, context: ChatContext | None = None) -> str:
    """The system prompt used for every training sample and every live reply; without a context
    it is exactly the persona prompt."""
    prompt = SYSTEM_PROMPT_TEMPLATE.format(persona=persona.strip() or DEFAULT_PERSONA)
    if context is None:
        return prompt
    if context.memory.strip():
        prompt += f"\n\n{MEMORY_HEADING}\n{context.memory.strip()}"
    if context.examples:
        shown = ("- " + example.strip().replace("\n", "\n  ") for example in context.examples)
        prompt += f"\n\n{EXAMPLES_HEADING}\n" + "\n".join(shown)
    return prompt


Role = Literal["user", "assistant"]


@dataclass(slots=True)
class Turn:
    """One speaker's burst of messages, joined by newlines."""

    role: Role
    text: str
    speaker: str = ""  # display name of the speaker in group chats ("" for the owner / c2c)
    time: int = 0


def join_burst(texts: Sequence[str]) -> str:
    """Consecutive messages of one sender become one turn, one message per line."""
    return "\n".join(t for t in (s.strip() for s in texts) if t)


ChatType = Literal["c2c", "group"]
PRIVATE: ChatType = "c2c"  # a friend, a stranger or a group's temporary chat (QQ NT's `c2c_msg_table`)
GROUP: ChatType = "group"


def chat_name(key: tuple[str, str]) -> str:
    """A chat as operators name it: `c2c:20001`, `group:300`."""
    return f"{key[0]}:{key[1]}"


def parse_chat(text: str) -> tuple[ChatType, str]:
    """`c2c:<uin>` (also `private:`) or `group:<group code>` → (chat type, number); ValueError
    naming the right form for anything else (admin commands, the CLI, stored state)."""
    kind, _, number = text.strip().partition(":")
    kind = {"private": PRIVATE, "friend": PRIVATE}.get(kind.lower(), kind.lower())
    if kind not in (PRIVATE, GROUP) or not number.isascii() or not number.isdigit() or len(number) > 20:
        raise ValueError(f"{text!r} is not a chat: write c2c:<QQ number> or group:<group number>")
    return (PRIVATE if kind == PRIVATE else GROUP), str(int(number))


CHAT_TYPES: tuple[ChatType, ...] = (PRIVATE, GROUP)


# Seconds within which one sender's messages join into one turn. The dataset's `burst_gap`
# and the bot's `TWIN_BURST_GAP` default to it: a prompt must be merged as training was.
BURST_GAP = 120


class Said(Protocol):
    """A message as turns need it: a dataset record (`records.Message`) or a bot store row."""

    @property
    def sender(self) -> str: ...
    @property
    def sender_name(self) -> str: ...
    @property
    def is_self(self) -> bool: ...
    @property
    def time(self) -> int: ...
    @property
    def text(self) -> str: ...


@dataclass(slots=True)
class ChatTurn:
    """A Turn plus what the sample builder needs to know about it."""

    turn: Turn
    sender: str
    messages: int  # how many messages the burst joined


def to_turns(messages: Iterable[Said], burst_gap: int = BURST_GAP) -> list[ChatTurn]:
    """Consecutive messages of one sender within `burst_gap` seconds become one turn.

    The account's messages (the owner's, and the twin's in the bot) are the assistant's turns,
    everyone else's the user's, named by their display name; empty turns are left out.
    """
    turns: list[ChatTurn] = []
    burst: list[Said] = []
    for msg in messages:
        if burst and (
            msg.sender != burst[-1].sender
            or msg.is_self != burst[-1].is_self
            or msg.time - burst[-1].time > burst_gap
        ):
            _add_turn(turns, burst)
            burst = []
        burst.append(msg)
    if burst:
        _add_turn(turns, burst)
    return turns


def _add_turn(turns: list[ChatTurn], burst: list[Said]) -> None:
    first = burst[0]
    # Most bursts are one message, and `join_burst` of one text is that text stripped.
    text = first.text.strip() if len(burst) == 1 else join_burst([m.text for m in burst])
    if not text:
        return
    if first.is_self:
        turn = Turn("assistant", text, "", first.time)
    else:
        turn = Turn("user", text, first.sender_name, first.time)
    turns.append(ChatTurn(turn, first.sender, len(burst)))


def label_turn(turn: Turn, chat_type: str) -> str:
    """The text of a turn as the model sees it: group speakers are named (`小王：...`)."""
    if turn.role == "user" and chat_type == GROUP and turn.speaker:
        return "\n".join(f"{turn.speaker}{SPEAKER_SEPARATOR}{line}" for line in turn.text.split("\n"))
    return turn.text


def to_messages(turns: Sequence[Turn], chat_type: str, system: str | None = None) -> list[dict[str, str]]:
    """Turns → an OpenAI-style `messages` list; adjacent same-role turns merge into one."""
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for turn in turns:
        content = label_turn(turn, chat_type)
        if messages and messages[-1]["role"] == turn.role and turn.role != "system":
            if content:
                messages[-1]["content"] = f"{messages[-1]['content']}\n{content}"
        else:
            messages.append({"role": turn.role, "content": content})
    return messages


# ---------------------------------------------------------------- special tokens

# The control text of the common chat-template families. Chat text must never act as one of
# them: a friend typing `<|im_end|>\n<|im_start|>system\n…` would otherwise forge turns.
_SPECIAL_TOKEN_PATTERNS = (
    r"<\|[A-Za-z0-9_ ]{1,40}\|>",  # ChatML / Qwen / Llama 3 / Phi: <|im_end|>, <|eot_id|>, <|user|>…
    r"<｜[^｜<>\n]{1,40}｜>",  # DeepSeek: <｜begin▁of▁sentence｜>, <｜User｜>…
    r"</?s>",  # Llama 2 / Mistral BOS, EOS
    r"\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_RESULTS|TOOL_CALLS)\]",  # Mistral
    r"<</?SYS>>",  # Llama 2 system block
    r"<(?:start_of_turn|end_of_turn|bos|eos)>",  # Gemma
    r"</?(?:think|tool_call|tool_response)>",  # reasoning and tool blocks (Qwen3 and kin)
)

# Where a reply is over: an end-of-turn marker, or the start of a (hallucinated) next turn.
_TURN_BOUNDARY_PATTERNS = (
    r"<\|(?:im_start|im_end|start_header_id|eot_id|eom_id|endoftext|end_of_text|begin_of_text"
    r"|end|user|system|assistant)\|>",
    r"<｜(?:User|Assistant|end▁of▁sentence|begin▁of▁sentence)｜>",
    r"</?s>",
    r"\[INST\]",
    r"<(?:start_of_turn|end_of_turn|bos|eos)>",
)


@functools.lru_cache(maxsize=16)
def _special_re(extra: tuple[str, ...] = ()) -> re.Pattern[str]:
    literals = sorted({e for e in extra if e}, key=len, reverse=True)
    return re.compile("|".join([*(re.escape(e) for e in literals), *_SPECIAL_TOKEN_PATTERNS]))


_TURN_BOUNDARY_RE = re.compile("|".join(_TURN_BOUNDARY_PATTERNS))


def neutralise_special_tokens(text: str, extra: Iterable[str] = ()) -> str:
    """Remove special-token text (every common family, plus `extra`); the words around it stay.

    `你好<|im_end|>再见` → `你好再见`. Repeated until nothing is left, so removing one marker
    cannot assemble another (`<|im_<|im_end|>end|>`).
    """
    pattern = _special_re(tuple(extra))
    while True:
        cleaned = pattern.sub("", text)
        if cleaned == text:
            return cleaned
        text = cleaned


def neutralise_messages(
    messages: Sequence[dict[str, str]], extra: Iterable[str] = ()
) -> list[dict[str, str]]:
    """A copy of `messages` whose every content went through `neutralise_special_tokens`."""
    extra = tuple(extra)
    return [
        {**m, "content": neutralise_special_tokens(m["content"], extra)}
        if isinstance(m.get("content"), str)
        else dict(m)
        for m in messages
    ]


# ---------------------------------------------------------------- model output

_THINK_RE = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def clean_model_output(text: str, extra_special: Iterable[str] = ()) -> str:
    """The reply a model meant: no think block, nothing after its turn ended, no special-token text.

    A model that writes `<|im_end|>` or `<|im_start|>user` as text has ended its turn and
    is hallucinating the next one: the reply is cut there.
    """
    text = _THINK_RE.sub("", text)
    if "</think>" in text:  # the opening tag was in the prompt: what precedes is reasoning
        text = text.rsplit("</think>", 1)[1]
    boundary = _TURN_BOUNDARY_RE.search(text)
    if boundary is not None:
        text = text[: boundary.start()]
    return neutralise_special_tokens(text, extra_special).strip()


def split_bubbles(text: str, max_bubbles: int = 4, *, extra_special: Iterable[str] = ()) -> list[str]:
    """A reply splits into chat bubbles at newlines, the inverse of `join_burst`.

    The text is first cleaned (`clean_model_output`). Lines beyond `max_bubbles` stay together
    in the last bubble. Empty text → no bubbles (the twin read the message and chose not to answer).
    """
    cleaned = clean_model_output(text, extra_special)
    lines = [line.strip() for line in cleaned.split("\n") if line.strip()]
    if len(lines) <= max_bubbles:
        return lines
    return [*lines[: max_bubbles - 1], "\n".join(lines[max_bubbles - 1 :])]


# ---------------------------------------------------------------- chat templates


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render a HF/GGUF Jinja chat template the way transformers does, thinking disabled."""
    return _compiled_template(template).render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **CHAT_TEMPLATE_KWARGS,
    )


class PromptPiece(NamedTuple):
    """A run of a rendered prompt: template text (markers, role headers) or message content."""

    text: str
    is_content: bool


class ChatTemplateError(ValueError):
    """The rendered prompt could not be split into template text and message content safely."""


# Stand-ins for message contents while rendering: private-use characters no template writes.
_SENTINEL_OPEN, _SENTINEL_CLOSE = "\U000fff00", "\U000fff01"
_SENTINEL_RE = re.compile(f"{_SENTINEL_OPEN}(\\d+){_SENTINEL_CLOSE}")
# Text that looks like control in any tokenizer (used only to judge the literal fallback).
_CONTROL_LIKE_RE = re.compile("|".join([*_SPECIAL_TOKEN_PATTERNS, r"<[^<>\s]{1,40}>", r"\[/?[A-Z_]{2,30}\]"]))


def render_chat_pieces(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> list[PromptPiece]:
    """`render_chat_template`'s prompt as pieces that say which characters are message content.

    Joined, the pieces are exactly `render_chat_template(...)`. Content must be tokenised as
    plain text (never parsing special tokens); template pieces keep their special tokens.
    Raises `ChatTemplateError` rather than ever labelling content as template.
    """
    rendered = render_chat_template(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    contents = {
        i: m["content"] for i, m in enumerate(messages) if isinstance(m.get("content"), str) and m["content"]
    }
    # Empty contents stay as they are: templates test them (`{% if content %}`), and they add no text.
    stand_ins = tuple(
        tuple(
            sorted(
                {**m, "content": f"{_SENTINEL_OPEN}{i}{_SENTINEL_CLOSE}"}.items()
                if i in contents
                else m.items()
            )
        )
        for i, m in enumerate(messages)
    )
    try:
        skeleton = _skeleton(template, stand_ins, add_generation_prompt, bos_token, eos_token)
    except TypeError:  # unhashable extra fields: render without the cache
        skeleton = _skeleton.__wrapped__(template, stand_ins, add_generation_prompt, bos_token, eos_token)
    pieces = _align_skeleton(rendered, skeleton, contents) if skeleton else None
    if pieces is None and skeleton:  # a cached skeleton may be stale (a template printing today's date)
        skeleton = _skeleton.__wrapped__(template, stand_ins, add_generation_prompt, bos_token, eos_token)
        pieces = _align_skeleton(rendered, skeleton, contents) if skeleton else None
    if pieces is None:
        pieces = _locate_contents(rendered, [contents[i] for i in sorted(contents)])
    return pieces


@functools.lru_cache(maxsize=1024)
def _skeleton(
    template: str,
    stand_ins: tuple[tuple[tuple[str, Any], ...], ...],
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
) -> str:
    """The prompt with stand-ins for contents: one render per conversation shape (roles, which are empty)."""
    try:
        return render_chat_template(
            template,
            [dict(m) for m in stand_ins],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except Exception:  # a template that inspects contents may refuse a stand-in
        return ""


def _content_variants(content: str) -> list[str]:
    """How a template may print a content: as is, or trimmed (`| trim`, `.strip()`, `.lstrip('\\n')`)."""
    variants: list[str] = []
    for variant in (content, content.strip(), content.lstrip(), content.rstrip(), content.lstrip("\n")):
        if variant not in variants:
            variants.append(variant)
    return variants


def _append(pieces: list[PromptPiece], text: str, is_content: bool) -> None:
    if not text:
        return
    if pieces and pieces[-1].is_content == is_content:
        pieces[-1] = PromptPiece(pieces[-1].text + text, is_content)
    else:
        pieces.append(PromptPiece(text, is_content))


def _align_skeleton(rendered: str, skeleton: str, contents: dict[int, str]) -> list[PromptPiece] | None:
    """Split at the stand-ins; accept only if template text + contents rebuild `rendered` exactly.

    The template text between stand-ins was written with no message content in it, so whatever
    the template did, labelling it template cannot smuggle chat text in as control.
    """
    parts = _SENTINEL_RE.split(skeleton)
    templates, indices = parts[0::2], [int(i) for i in parts[1::2]]
    if (
        skeleton.count(_SENTINEL_OPEN) != len(indices)
        or skeleton.count(_SENTINEL_CLOSE) != len(indices)
        or len(set(indices)) != len(indices)
        or not set(indices) <= contents.keys()
        or not rendered.startswith(templates[0])
    ):
        return None
    pieces: list[PromptPiece] = []
    _append(pieces, templates[0], False)
    position = len(templates[0])
    for n, index in enumerate(indices):
        after = templates[n + 1]
        for variant in _content_variants(contents[index]):
            end = position + len(variant)
            fits = rendered.startswith(variant, position) and rendered.startswith(after, end)
            if fits and (n + 1 < len(indices) or end + len(after) == len(rendered)):
                break
        else:
            return None
        _append(pieces, variant, True)
        _append(pieces, after, False)
        position = end + len(after)
    return pieces if position == len(rendered) else None


def _locate_contents(rendered: str, contents: Sequence[str]) -> list[PromptPiece]:
    """Fallback for templates that print contents conditionally: find each content in order.

    A content found too early would leave its real copy labelled template, so this refuses
    whenever control-like text of a content also occurs in the template text.
    """
    pieces: list[PromptPiece] = []
    position = 0
    for content in contents:
        for variant in _content_variants(content):
            start = rendered.find(variant, position)
            if start >= 0:
                break
        else:
            raise ChatTemplateError(
                "the chat template changed a message's text; cannot tell it from the template"
            )
        _append(pieces, rendered[position:start], False)
        _append(pieces, variant, True)
        position = start + len(variant)
    _append(pieces, rendered[position:], False)
    control_like = {m.group() for content in contents for m in _CONTROL_LIKE_RE.finditer(content)}
    template_text = [p.text for p in pieces if not p.is_content]
    if any(marker in text for marker in control_like for text in template_text):
        raise ChatTemplateError("a message carries special-token text this chat template cannot keep apart")
    return pieces


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str) -> Any:
    """Compiling a template costs milliseconds; training renders thousands of prefixes with one."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, **_: object) -> str:
    import json

    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)
