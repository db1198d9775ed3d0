"""build_dataset end to end on generated messages: files, split, formats, mixing, privacy, bad input."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from pipeline.chatformat import at_placeholder
from pipeline.dataset.build import build_dataset
from pipeline.dataset.formats import record_line, to_record
from pipeline.dataset.samples import Sample
from pipeline.dataset.settings import DEFAULT_RULES_FILE, DatasetSettings
from pipeline.errors import InputError
from pipeline.records import Message, write_messages

T0 = 1_700_000_000
OWNER = "999"
DAY = 86400


def history(days: int = 10) -> list[Message]:
    """One private and one group conversation a day; the owner answers in both."""
    out: list[Message] = []
    for d in range(days):
        t = T0 + d * DAY
        rows = [
            ("c2c", "100", "100", "小王", t, f"第{d}天在吗"),
            ("c2c", "100", OWNER, "", t + 20, "在的[doge]"),
            ("c2c", "100", OWNER, "", t + 25, "咋了"),
            ("c2c", "100", "100", "小王", t + 90, "明天 14:30 见？带 3 份，¥25 一份"),
            ("c2c", "100", OWNER, "", t + 120, "好耶 绝了"),
            ("group", "200", "300", "老李", t + 600, "晚上吃啥"),
            ("group", "200", "301", "阿花", t + 610, "火锅！"),
            ("group", "200", OWNER, "", t + 640, "笑死 我都行"),
        ]
        for i, (ct, chat, sender, name, time, text) in enumerate(rows):
            out.append(
                Message(f"{d}-{i}", ct, chat, sender, name, sender == OWNER, time, text, kinds=["text"])
            )
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_outputs_are_private_complete_and_described_by_the_report(tmp_path):
    out = tmp_path / "dataset"
    report = build_dataset(history(), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset_info.json",
        "report.json",
        "train.jsonl",
        "val.jsonl",
    ]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dir left behind"
    saved = json.loads((out / "report.json").read_text())
    assert saved == report.to_dict()
    assert saved["messages"] == 80
    assert saved["owner_messages"] == 40
    assert saved["owner_share"] == 1.0
    assert saved["samples"]["train"] + saved["samples"]["val"] == 30
    assert saved["estimated_tokens"]["train"] > 0
    assert "api_key" not in saved["settings"]["llm"]


def test_validation_holds_the_latest_conversations(tmp_path):
    build_dataset(history(10), tmp_path / "d", DatasetSettings(val_fraction=0.1), progress=False)
    val = read_jsonl(tmp_path / "d" / "val.jsonl")
    train = read_jsonl(tmp_path / "d" / "train.jsonl")
    # 20 conversations → the 2 latest (day 9's private and group chats) are validation.
    assert len(val) == 3
    assert any("第9天" in m["content"] for s in val for m in s["messages"])
    assert not any("第9天" in m["content"] for s in train for m in s["messages"])


def llama_factory_rows(directory: Path, name: str) -> list[list[dict]]:
    """Read a dataset the way LLaMA-Factory's converters do (data/README schema) → role/content turns."""
    info = json.loads((directory / "dataset_info.json").read_text())[name]
    columns = info.get("columns", {})
    rows = []
    for record in read_jsonl(directory / info["file_name"]):
        if info.get("formatting", "alpaca") == "sharegpt":
            tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                    "system_tag": "system", **info.get("tags", {})}  # fmt: skip
            turns = record[columns.get("messages", "conversations")]
            if turns and turns[0][tags["role_tag"]] == tags["system_tag"]:
                turns = turns[1:]
            expected = [tags["user_tag"], tags["assistant_tag"]]
            assert len(turns) % 2 == 0
            assert all(t[tags["role_tag"]] == expected[i % 2] for i, t in enumerate(turns))
            rows.append([{"role": ("user", "assistant")[i % 2], "content": t[tags["content_tag"]]}
                         for i, t in enumerate(turns)])  # fmt: skip
        else:
            turns = []
            for prompt, response in record.get(columns.get("history", "history")) or []:
                turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            prompt = record[columns.get("prompt", "instruction")]
            query = record.get(columns.get("query", "input")) or ""
            turns += [
                {"role": "user", "content": "\n".join(p for p in (prompt, query) if p)},
                {"role": "assistant", "content": record[columns.get("response", "output")]},
            ]
            rows.append(turns)
    return rows


@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "alpaca"])
def test_every_format_loads_through_dataset_info_with_the_same_turns(tmp_path, fmt):
    build_dataset(history(4), tmp_path / "openai", DatasetSettings(format="openai"), progress=False)
    build_dataset(history(4), tmp_path / fmt, DatasetSettings(format=fmt), progress=False)
    reference = [
        [m for m in r["messages"] if m["role"] != "system"]
        for r in read_jsonl(tmp_path / "openai" / "train.jsonl")
    ]
    assert llama_factory_rows(tmp_path / fmt, "twin_train") == reference
    assert len(llama_factory_rows(tmp_path / fmt, "twin_val")) > 0


def test_openai_records_are_tagged_with_their_source(tmp_path):
    build_dataset(history(3), tmp_path / "d", progress=False)
    for record in read_jsonl(tmp_path / "d" / "train.jsonl"):
        assert record["source"] == "owner"
        assert record["messages"][0]["role"] == "system"
        assert record["chat_type"] in ("c2c", "group")


def write_mix(path: Path) -> Path:
    lines = []
    for i in range(30):
        if i % 3 == 0:
            lines.append(
                {
                    "messages": [
                        {"role": "user", "content": f"问题{i}"},
                        {"role": "assistant", "content": f"答{i}"},
                    ]
                }
            )
        elif i % 3 == 1:
            lines.append(
                {
                    "conversations": [
                        {"from": "human", "value": f"问题{i}"},
                        {"from": "gpt", "value": f"答{i}"},
                    ]
                }
            )
        else:
            lines.append({"instruction": f"问题{i}", "input": "", "output": f"答{i} 联系 a@b.cn"})
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


def test_mixed_data_makes_up_the_ratio_is_tagged_and_deterministic(tmp_path):
    mix = write_mix(tmp_path / "mix.jsonl")
    settings = DatasetSettings(mix=str(mix), mix_ratio=0.25, val_fraction=0.1, seed=7)
    report = build_dataset(history(10), tmp_path / "a", settings, progress=False)
    build_dataset(history(10), tmp_path / "b", settings, progress=False)
    train = read_jsonl(tmp_path / "a" / "train.jsonl")
    mixed = [r for r in train if r["source"] == "mix"]
    owner = [r for r in train if r["source"] == "owner"]
    assert len(mixed) == report.samples["mix"] == round(0.25 * len(owner) / 0.75)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert all(r["source"] == "owner" for r in read_jsonl(tmp_path / "a" / "val.jsonl"))
    assert not any("a@b.cn" in m["content"] for r in mixed for m in r["messages"])
    other = build_dataset(history(10), tmp_path / "c", settings.with_overrides(seed=8), progress=False)
    assert other.samples["mix"] == report.samples["mix"]
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()


def test_a_bad_mix_record_is_reported_with_its_line(tmp_path):
    mix = tmp_path / "mix.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    mix.write_text(json.dumps(good) + '\n{"text": "not a chat"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        build_dataset(
            history(3), tmp_path / "d", DatasetSettings(mix=str(mix), mix_ratio=0.5), progress=False
        )
    assert not (tmp_path / "d").exists()


def test_a_malformed_line_fails_with_its_number_and_writes_nothing(tmp_path):
    src = tmp_path / "messages.jsonl"
    write_messages(src, history(2))
    lines = src.read_text(encoding="utf-8").splitlines()
    lines.insert(4, '{"msg_id": "broken"')
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"line 5.*--skip-bad"):
        build_dataset(src, tmp_path / "d", progress=False)
    assert list(tmp_path.iterdir()) == [src]

    report = build_dataset(src, tmp_path / "d", DatasetSettings(skip_bad=True), progress=False)
    assert report.bad_lines == [5]
    assert report.messages == 16


def test_a_failed_rebuild_leaves_the_previous_dataset_untouched(tmp_path):
    build_dataset(history(3), tmp_path / "d", progress=False)
    before = (tmp_path / "d" / "train.jsonl").read_bytes()
    with pytest.raises(InputError, match="no training samples"):
        build_dataset([m for m in history(3) if not m.is_self], tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "train.jsonl").read_bytes() == before


CANARIES = {
    "phone": "13798765432",
    "id_number": "11010519491231002X",
    "bank_card": "6222021234567890128",
    "email": "canary.zhang@example.org",
    "qq": "QQ号：31415926",
    "wechat": "微信：zhang_san88",
    "mention": at_placeholder("", "27182818"),  # someone with no known name: `@27182818`
    "fullwidth_phone": "１３８００１３８０００",
}
# What must not reach any output file: each value without its label, full-width digits also folded.
LEAKS = (
    "13798765432",
    "11010519491231002X",
    "6222021234567890128",
    "canary.zhang",
    "31415926",
    "zhang_san88",
    "27182818",
    "１３８００１３８０００",
    "13800138000",
)


def test_planted_personal_data_never_reaches_any_output_file(tmp_path):
    messages = history(6)
    t = T0 + 6 * DAY
    card_name = f"小王 {CANARIES['phone']}"
    for i, (kind, value) in enumerate(CANARIES.items()):
        messages += [
            Message(f"c{i}a", "c2c", "100", "100", card_name, False, t + i * 100, f"我的{kind}是 {value}"),
            Message(f"c{i}b", "c2c", "100", OWNER, "", True, t + i * 100 + 10, f"好的 我的是 {value} 记下了"),
            Message(f"c{i}c", "group", "200", "300", "老李", False, t + i * 100 + 20, f"{value}"),
            Message(f"c{i}d", "group", "200", OWNER, "", True, t + i * 100 + 30, f"收到{value}"),
        ]  # fmt: skip
    mix = tmp_path / "mix.jsonl"
    mix.write_text(
        json.dumps(
            {
                "instruction": f"联系 {CANARIES['email']} 或 {CANARIES['wechat']} {CANARIES['mention']}",
                "output": f"{CANARIES['phone']} zhang_san88 27182818 {CANARIES['fullwidth_phone']}",
            }
        )
        + "\n"
    )
    for fmt in ("openai", "sharegpt", "alpaca"):
        out = tmp_path / fmt
        settings = DatasetSettings(
            format=fmt, mix=str(mix), mix_ratio=0.5, no_reply_samples=1.0, val_fraction=0.3
        )
        report = build_dataset(messages, out, settings, progress=False)
        assert report.samples["val"] > 0
        assert {"phone", "id_number", "bank_card", "email", "qq", "wechat"} <= set(report.redactions)
        blobs = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
        for value in LEAKS:
            assert value.encode() not in blobs, f"{value} leaked into {fmt}"


# ---------------------------------------------------------------- settings


def test_the_shipped_rules_file_states_the_defaults():
    assert DatasetSettings.from_file(DEFAULT_RULES_FILE) == DatasetSettings()


def test_a_settings_file_is_overridden_by_flags(tmp_path):
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("session_gap: 600\ncontext_turns: 3\nrules:\n  max_repeats: 5\n", encoding="utf-8")
    settings = DatasetSettings.from_file(yaml_file, context_turns=4, rules={"max_message_chars": 99})
    assert (settings.session_gap, settings.context_turns) == (600, 4)
    assert (settings.rules.max_repeats, settings.rules.max_message_chars) == (5, 99)


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        ("session_gap = -1\n", "session_gap"),
        ("[rules]\nmax_repeatz = 3\n", "max_repeatz"),
        ("= broken", "not a valid"),
    ],
)
def test_bad_settings_name_the_file_and_the_key(tmp_path, content, cause):
    path = tmp_path / "rules.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=cause) as info:
        DatasetSettings.from_file(path)
    assert str(path) in str(info.value)


def test_record_lines_are_exactly_what_json_dumps_writes():
    """The hand-assembled OpenAI line matches `json.dumps(..., ensure_ascii=False)` on awkward text."""
    awkward = ['"\\', "tab\there\r\n", "\u2028 \u2029", "😀 emoji", "\x00\x1f", "</script>", "引号", ""]
    turns = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(awkward)]
    samples = [
        Sample(messages=[{"role": "system", "content": "系统"}, *turns], chat_type="group"),
        Sample(messages=[{"content": "键序不同", "role": "user"}], chat_type="c2c"),
        Sample(messages=[{"role": "user", "content": "多", "name": "x"}], source="mix", chat_type="mix"),
        Sample(messages=[{"role": "user", "content": 5}]),
    ]
    for sample in samples:
        for fmt in ("openai", "sharegpt"):
            assert record_line(sample, fmt) == json.dumps(to_record(sample, fmt), ensure_ascii=False) + "\n"
    odd = Sample(messages=[{"role": "user", "text": "缺内容"}])
    assert record_line(odd, "openai") == json.dumps(to_record(odd, "openai"), ensure_ascii=False) + "\n"
