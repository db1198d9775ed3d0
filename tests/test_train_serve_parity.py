"""What the twin is served must be what it was trained on: the same turns, the same hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.memory import build_prompt, history_turns
from bot.store import StoredMessage
from deploy.retrain import to_record
from pipeline.chatformat import BURST_GAP, to_turns
from pipeline.dataset.build import build_samples
from pipeline.dataset.settings import DatasetSettings

OWNER = "10000"
T0 = 1_700_000_000


def stored(origin: str, text: str, at: int, sender: str = OWNER, name: str = "") -> StoredMessage:
    return StoredMessage(
        chat_type="group",
        chat="500",
        sender=sender,
        sender_name=name,
        origin=origin,
        text=text,
        time=T0 + at,
        msg_id=f"m{at}",
    )


def group_history() -> list[StoredMessage]:
    """Two friends and the owner; 小王's first burst is split by a silence longer than the burst gap."""
    return [
        stored("incoming", "今晚吃啥", 0, "20001", "小王"),
        stored("incoming", "火锅还是烧烤", 30, "20001", "小王"),
        stored("incoming", "都行", 40, "20002", "老李"),
        stored("owner", "火锅吧", 60),
        stored("owner", "好久没吃了", 70),
        stored("incoming", "那我订位子", 100, "20001", "小王"),
        stored("incoming", "几点", 100 + 600, "20001", "小王"),  # same sender, after a long gap
        stored("incoming", "七点？", 100 + 610, "20001", "小王"),
    ]


@pytest.mark.parametrize("burst_gap", [120, 30])
def test_the_served_prompt_is_the_training_sample_for_the_same_history(burst_gap: int) -> None:
    history = group_history()
    reply = stored("owner", "七点可以", 100 + 620)
    settings = DatasetSettings(burst_gap=burst_gap, persona="阿明")
    samples = list(build_samples(map(to_record, [*history, reply]), settings))
    answered = next(s for s in samples if s.messages[-1]["content"] == "七点可以")

    served = build_prompt(history, "group", "阿明", burst_gap=burst_gap)

    assert served == answered.messages[:-1]
    assert served[-1] == {"role": "user", "content": "小王：那我订位子\n小王：几点\n小王：七点？"}


def test_the_bot_merges_bursts_with_the_dataset_burst_gap() -> None:
    turns = history_turns(group_history())  # the default gap is the dataset's default
    assert DatasetSettings().burst_gap == BURST_GAP
    assert [(t.role, t.speaker, t.text) for t in turns] == [
        ("user", "小王", "今晚吃啥\n火锅还是烧烤"),
        ("user", "老李", "都行"),
        ("assistant", "", "火锅吧\n好久没吃了"),
        ("user", "小王", "那我订位子"),  # ten minutes of silence end the burst
        ("user", "小王", "几点\n七点？"),
    ]
    assert [t.turn for t in to_turns(map(to_record, group_history()))] == turns


def test_the_same_data_gives_the_same_hash_by_every_path(tmp_path: Path) -> None:
    from deploy import retrain
    from trainer import data

    rows = [{"messages": [{"role": "user", "content": "在吗"}, {"role": "assistant", "content": "在"}]}]
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text("", encoding="utf-8")

    assert retrain.dataset_hash is data.dataset_hash  # one function, imported by both
    train_manifest_hash = data.dataset_hash(tmp_path)  # what `twin train` records
    retrain_manifest_hash = retrain.dataset_hash(tmp_path)  # what `twin retrain` records
    assert train_manifest_hash == retrain_manifest_hash and train_manifest_hash.startswith("sha256:")


async def test_the_served_prompt_with_examples_is_the_training_sample_for_the_same_point(
    tmp_path: Path,
) -> None:
    import asyncio
    import time

    from bot.config import Config
    from bot.runtime import Twin
    from pipeline.chatformat import EXAMPLES_HEADING
    from tests.bot_helpers import ScriptedBackend

    now = int(time.time())

    def c2c(origin: str, text: str, at: int) -> StoredMessage:
        sender = OWNER if origin == "owner" else "20001"
        return StoredMessage("c2c", "20001", sender, origin, text, now - 86_400 + at, msg_id=f"p{at}")

    earlier = [
        c2c("incoming", "今晚吃啥", 0),
        c2c("owner", "火锅吧", 60),
        c2c("incoming", "几点", 100),
        c2c("owner", "七点", 120),
    ]
    later = [c2c("incoming", "今晚吃啥呀", 7300), c2c("incoming", "快说", 7310)]  # the next conversation
    reply = c2c("owner", "烧烤吧", 7360)
    settings = DatasetSettings(persona="阿明", examples=2)
    samples = list(build_samples(map(to_record, [*earlier, *later, reply]), settings))
    answered = next(s for s in samples if s.messages[-1]["content"] == "烧烤吧")

    config = Config(twin_db=tmp_path / "bot.db", twin_persona="阿明", twin_examples=2)
    twin = Twin(config, nicknames=[], backend=ScriptedBackend())
    await twin.start()
    for message in [*earlier, *later]:
        await twin.record(message)
    while twin.replies is None:
        await asyncio.sleep(0.01)
    served = build_prompt(later, "c2c", "阿明", context=twin.examples_context(("c2c", "20001"), later))
    await twin.close()

    assert served == answered.messages[:-1]
    assert served[0]["content"].endswith(f"{EXAMPLES_HEADING}\n- 火锅吧")
