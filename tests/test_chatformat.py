"""The shared chat format: what both training samples and live prompts are made of."""

from __future__ import annotations

from pipeline.chatformat import (
    ANIMATED_STICKER,
    IMAGE,
    Element,
    Turn,
    clean_model_output,
    face_placeholder,
    is_placeholder_only,
    join_burst,
    render_chat_template,
    render_elements,
    split_bubbles,
    system_prompt,
    to_messages,
)


def test_face_renders_from_text_or_from_id_table():
    assert face_placeholder(None, "/微笑") == "[微笑]"
    assert face_placeholder(14) == "[微笑]"
    assert face_placeholder("179") == "[doge]"
    assert face_placeholder(99999) == "[表情]"


def test_elements_concatenate_in_order_and_replies_add_no_text():
    text, kinds, reply = render_elements(
        [
            Element("reply", ref="42"),
            Element("at", text="@小王", ref="10001"),
            Element("text", text=" 看这个"),
            Element("face", text="/doge", ref="179"),
            Element("image"),
            Element("image", text=ANIMATED_STICKER),
            Element("sticker", text="[贴贴]"),
            Element("voice", text=""),
        ]
    )
    assert text == f"@小王 看这个[doge]{IMAGE}{ANIMATED_STICKER}[贴贴][语音]"
    assert kinds == ["reply", "at", "text", "face", "image", "sticker", "voice"]
    assert reply == "42"


def test_voice_with_transcript_renders_the_transcript():
    assert render_elements([Element("voice", text="我马上到")])[0] == "我马上到"


def test_placeholder_only_detection():
    assert is_placeholder_only("[图片]")
    assert is_placeholder_only(" [图片][视频] ")
    assert not is_placeholder_only("[图片] 好看吗")


def test_group_turns_are_labelled_with_speaker_names_and_same_roles_merge():
    turns = [
        Turn("user", "今晚开黑吗\n几点", speaker="小王"),
        Turn("user", "我也来", speaker="小李"),
        Turn("assistant", "笑死\n九点"),
    ]
    messages = to_messages(turns, "group", system_prompt("阿明"))
    assert messages[0]["role"] == "system" and "阿明" in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": "小王：今晚开黑吗\n小王：几点\n小李：我也来"}
    assert messages[2] == {"role": "assistant", "content": "笑死\n九点"}


def test_private_turns_carry_no_speaker_label():
    messages = to_messages([Turn("user", "在吗", speaker="小王")], "c2c")
    assert messages == [{"role": "user", "content": "在吗"}]


def test_bubbles_are_the_inverse_of_burst_joining():
    assert split_bubbles(join_burst(["好耶", " 明天见 ", ""])) == ["好耶", "明天见"]
    assert split_bubbles("a\nb\nc\nd\ne", max_bubbles=3) == ["a", "b", "c\nd\ne"]
    assert split_bubbles("") == []


def test_think_blocks_are_stripped_even_when_unclosed():
    assert clean_model_output("<think>嗯…</think>\n好的") == "好的"
    assert clean_model_output("好的<think>还在想") == "好的"


def test_chat_template_renders_with_thinking_disabled():
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% if not enable_thinking %}<think></think>{% endif %}"
        "{% endif %}"
    )
    prompt = render_chat_template(template, [{"role": "user", "content": "在吗"}])
    assert prompt == "<|user|>在吗\n<|assistant|><think></think>"


def test_a_chat_context_goes_after_the_persona_and_an_empty_one_changes_nothing():
    from pipeline.chatformat import EXAMPLES_HEADING, MEMORY_HEADING, ChatContext, system_prompt

    assert system_prompt("小明", ChatContext()) == system_prompt("小明") == system_prompt("小明", None)
    prompt = system_prompt("小明", ChatContext(memory="他下周三生日", examples=("好呀", "行\n明天见")))
    assert prompt.startswith(system_prompt("小明"))
    assert prompt.index(MEMORY_HEADING) < prompt.index("他下周三生日") < prompt.index(EXAMPLES_HEADING)
    assert prompt.endswith("- 好呀\n- 行\n  明天见")
