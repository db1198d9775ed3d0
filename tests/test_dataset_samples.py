"""Conversations, turns, cleaning rules and samples, as pure functions on generated messages."""

from __future__ import annotations

import random
from collections import Counter

from pipeline.chatformat import system_prompt, to_messages
from pipeline.dataset.build import BuildStats, build_samples
from pipeline.dataset.clean import clean_messages
from pipeline.dataset.conversations import iter_conversations, to_turns
from pipeline.dataset.samples import estimate_messages_tokens, estimate_tokens
from pipeline.dataset.settings import DatasetSettings, RuleSettings
from pipeline.records import Message

T0 = 1_700_000_000
OWNER = "999"


def msg(
    t: int, sender: str, text: str, *, chat: str = "100", group: bool = False, name: str = "", kinds=None
):
    return Message(
        msg_id=f"{chat}-{t}-{sender}",
        chat_type="group" if group else "c2c",
        chat=chat,
        sender=sender,
        sender_name=name,
        is_self=sender == OWNER,
        time=T0 + t,
        text=text,
        kinds=kinds or ["text"],
    )


def samples(messages, **settings):
    return list(build_samples(messages, DatasetSettings(**settings)))


# ---------------------------------------------------------------- conversations and turns


def test_a_long_silence_starts_a_new_conversation():
    messages = [msg(0, "1", "a"), msg(60, OWNER, "b"), msg(60 + 3601, "1", "c")]
    convs = list(iter_conversations(messages, session_gap=3600))
    assert [[m.text for m in c.messages] for c in convs] == [["a", "b"], ["c"]]


def test_chats_are_separated_even_when_interleaved():
    messages = [msg(0, "1", "a", chat="A"), msg(1, "2", "x", chat="B"), msg(2, OWNER, "b", chat="A")]
    convs = {c.chat: [m.text for m in c.messages] for c in iter_conversations(messages, 3600)}
    assert convs == {"A": ["a", "b"], "B": ["x"]}


def test_conversations_stream_out_before_the_input_ends():
    """Memory stays bounded: a finished conversation is emitted while later input is unread."""
    consumed = []

    def stream():
        for day in range(100):
            for i in range(3):
                m = msg(day * 86400 + i, "1" if i % 2 == 0 else OWNER, f"{day}-{i}", chat=str(day % 7))
                consumed.append(m)
                yield m

    convs = iter_conversations(stream(), session_gap=3600)
    first = next(convs)
    assert first.messages[0].text == "0-0"
    assert len(consumed) < 10


def test_a_burst_of_one_sender_becomes_one_turn_joined_by_newlines():
    messages = [msg(0, "1", "在吗"), msg(5, OWNER, "在"), msg(10, OWNER, "咋了"), msg(400, OWNER, "人呢")]
    turns = to_turns(messages, burst_gap=120)
    assert [(t.turn.role, t.turn.text, t.messages) for t in turns] == [
        ("user", "在吗", 1),
        ("assistant", "在\n咋了", 2),
        ("assistant", "人呢", 1),
    ]


# ---------------------------------------------------------------- cleaning rules


def test_each_rule_drops_what_it_names_and_counts_it():
    rules = RuleSettings(bot_senders=["42"], max_message_chars=50)
    messages = [
        msg(0, "1", "/签到"),
        msg(1, "42", "签到成功"),
        msg(2, "1", "[聊天记录]", kinds=["forward"]),
        msg(3, "1", "[卡片]", kinds=["card"]),
        msg(4, "1", "长" * 51),
        msg(5, "1", "https://b23.tv/xyz"),
        msg(6, OWNER, "[图片]", kinds=["image"]),
        msg(7, "1", "哈"),
        msg(8, "1", "哈"),
        msg(9, "1", "哈"),
        msg(10, "1", "哈"),
        msg(11, OWNER, "...好吧"),
    ]
    dropped: Counter[str] = Counter()
    kept = clean_messages(messages, rules, dropped)
    assert [m.text for m in kept] == ["哈", "哈", "...好吧"]
    assert dropped == {
        "bot_command": 1,
        "bot_sender": 1,
        "forward_or_card": 2,
        "long_paste": 1,
        "link_only": 1,
        "placeholder_only": 1,
        "repeated_spam": 2,
    }


def test_owner_stickers_and_faces_are_kept_as_style():
    messages = [
        msg(0, OWNER, "[动画表情]", kinds=["sticker"]),
        msg(1, OWNER, "[贴贴]", kinds=["sticker"]),
        msg(2, OWNER, "[doge]", kinds=["face"]),
        msg(3, "1", "[图片]", kinds=["image"]),
    ]
    dropped: Counter[str] = Counter()
    assert len(clean_messages(messages, RuleSettings(), dropped)) == 4
    assert not dropped


def test_a_message_with_a_link_and_words_is_kept():
    kept = clean_messages([msg(0, "1", "这个好笑 https://b23.tv/xyz 你看看")], RuleSettings(), Counter())
    assert len(kept) == 1


# ---------------------------------------------------------------- samples


def test_every_sample_ends_at_an_owner_reply_with_the_shared_system_prompt():
    messages = [msg(0, "1", "在吗"), msg(10, OWNER, "在的"), msg(20, "1", "吃了吗"), msg(30, OWNER, "吃了")]
    out = samples(messages, persona="小林")
    assert [s.messages[-1] for s in out] == [
        {"role": "assistant", "content": "在的"},
        {"role": "assistant", "content": "吃了"},
    ]
    assert all(s.messages[0] == {"role": "system", "content": system_prompt("小林")} for s in out)
    assert [m["role"] for m in out[1].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_assistant_turns_are_only_ever_the_owner_words():
    messages = [msg(0, "1", "你好"), msg(10, "2", "我是小二", group=True), msg(20, OWNER, "嗨")]
    for sample in samples(messages):
        for m in sample.messages:
            if m["role"] == "assistant":
                assert m["content"] == "嗨"


def test_group_speakers_are_named_in_user_turns():
    messages = [
        msg(0, "1", "晚上吃啥", group=True, name="老李"),
        msg(5, "2", "火锅！", group=True, name="阿花"),
        msg(9, OWNER, "我都行", group=True),
    ]
    (sample,) = samples(messages)
    assert sample.messages[1:] == [
        {"role": "user", "content": "老李：晚上吃啥\n阿花：火锅！"},
        {"role": "assistant", "content": "我都行"},
    ]


def test_context_is_limited_to_context_turns_and_starts_with_a_user_turn():
    messages = []
    for i in range(10):
        messages += [msg(i * 200, "1", f"q{i}"), msg(i * 200 + 100, OWNER, f"a{i}")]
    last = samples(messages, context_turns=3)[-1]
    assert [m["content"] for m in last.messages[1:]] == ["q8", "a8", "q9", "a9"]


def test_the_token_budget_trims_the_oldest_context_first():
    messages = [
        msg(0, "1", "长" * 300),
        msg(100, OWNER, "嗯"),
        msg(200, "1", "短问题"),
        msg(300, OWNER, "好"),
    ]
    last = samples(messages, max_context_tokens=120)[-1]
    assert [m["content"] for m in last.messages[1:]] == ["短问题", "好"]


def test_an_owner_turn_with_nothing_before_it_makes_no_sample():
    stats = BuildStats()
    out = list(build_samples([msg(0, OWNER, "早"), msg(5, "1", "早呀")], DatasetSettings(), stats=stats))
    assert out == []
    assert stats.skipped == {"owner_turn_without_context": 1}


def test_no_reply_samples_end_with_an_empty_assistant_turn():
    messages = [msg(0, "1", "在吗"), msg(10, OWNER, "在"), msg(20, "1", "那我先睡了")]
    out = samples(messages, no_reply_samples=1.0)
    silent = [s for s in out if s.kind == "no_reply"]
    assert len(silent) == 1
    assert silent[0].messages[-2:] == [
        {"role": "user", "content": "那我先睡了"},
        {"role": "assistant", "content": ""},
    ]
    assert samples(messages, no_reply_samples=0.0)[-1].kind == "reply"


def test_text_is_redacted_before_it_reaches_a_sample():
    messages = [
        msg(0, "1", "我电话13812345678", name="张三 13912345678", group=True),
        msg(9, OWNER, "好", group=True),
    ]
    (sample,) = samples(messages, redact_names=["张三"])
    assert sample.messages[1]["content"] == "<姓名> <手机号>：我电话<手机号>"


def test_token_estimate_counts_cjk_characters_and_ascii_by_four():
    assert estimate_tokens("你好") == 2
    assert estimate_tokens("abcdefgh") == 2
    assert estimate_tokens("hi 你好") == 3


def test_a_qq_number_given_in_context_is_redacted_when_the_owner_repeats_it():
    messages = [msg(0, "1", "我QQ号是 31415926 加我"), msg(9, OWNER, "好 31415926 加了")]
    (sample,) = samples(messages)
    assert [m["content"] for m in sample.messages[1:]] == ["我QQ号是 <QQ号> 加我", "好 <QQ号> 加了"]


def test_a_conversation_that_never_falls_silent_is_cut_at_the_message_cap():
    messages = [msg(i * 10, "1" if i % 2 else OWNER, f"m{i}") for i in range(25)]
    convs = list(iter_conversations(messages, session_gap=3600, max_messages=10))
    assert [len(c.messages) for c in convs] == [10, 10, 5]


def test_sample_messages_are_chatformat_messages_of_their_turns_and_tokens_their_estimate():
    """Samples build their messages from turns labelled once; they must equal `to_messages`."""
    rng = random.Random(7)
    senders = [OWNER, "1", "2", "3"]
    messages = []
    t = 0
    for i in range(400):
        t += rng.choice([5, 60, 200, 4000])
        sender = rng.choice(senders)
        text = rng.choice(["好", "哈哈 ok", "在吗？", "see you  tomorrow", "[图片]", "嗯\n对", "。。。"])
        messages.append(msg(t, sender, f"{text}{i}", group=True, name=f"群友{sender}"))
    settings = DatasetSettings(no_reply_samples=0.5, context_turns=6, max_context_tokens=90)
    stats = BuildStats()
    built = list(build_samples(messages, settings, stats=stats))
    assert {s.kind for s in built} == {"reply", "no_reply"}
    assert stats.skipped["over_token_budget"] > 0  # some windows were trimmed to fit
    by_time = {}
    for conv in iter_conversations(messages, settings.session_gap):
        for turn in to_turns(conv.messages, settings.burst_gap):
            by_time.setdefault(turn.turn.time, []).append(turn.turn)
    system = system_prompt(settings.persona)
    for sample in built:
        turns = [t for time in sorted(by_time) if sample.start <= time <= sample.end for t in by_time[time]]
        expected = to_messages(turns, "group", system=system)
        if sample.kind == "no_reply":
            expected.append({"role": "assistant", "content": ""})
        assert sample.messages == expected
        assert sample.tokens == estimate_messages_tokens(sample.messages)
