"""The whole path on the real SmolLM2 GGUF: an encrypted QQ database to a twin answering over OneBot."""

from __future__ import annotations

import json

import pytest

from deploy.cli import main
from deploy.onebot_client import OneBotRefused
from pipeline.ntqq.sampledb import OWNER_NAME, SAMPLE_KEY
from tests.e2e.conftest import OWNER, bot_env, running_bot

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _assistant_turns(path) -> list[str]:
    turns = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            turns += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
    return turns


@pytest.fixture(scope="module")
def exported_twin(tmp_path_factory):
    """Run every CLI stage once, as a user would, and hand the model directory on."""
    root = tmp_path_factory.mktemp("full-path")
    db = root / "qq" / "nt_msg.db"
    messages, dataset, run, model = root / "messages.jsonl", root / "dataset", root / "run", root / "model"

    assert main(["sample-db", "-o", str(root / "qq"), "--messages", "800"]) == 0
    assert main(["extract", str(db), "--key", SAMPLE_KEY, "-o", str(messages)]) == 0
    assert main(["build-dataset", str(messages), "-o", str(dataset), "--persona", OWNER_NAME]) == 0
    assert _assistant_turns(dataset / "train.jsonl"), "the owner's replies must become assistant turns"
    assert (
        main(
            [
                "train",
                "--data",
                str(dataset),
                "--base-model",
                "smollm2",
                "-o",
                str(run),
                "--max-steps",
                "3",
            ]
        )
        == 0
    )
    assert json.loads((run / "metrics.json").read_text())["train_tokens"] > 0
    assert main(["export", str(run), "-o", str(model), "--quant", "Q8_0"]) == 0
    assert (model / "model-Q8_0.gguf").is_file()
    return root, model


@pytest.fixture(scope="module")
def twin_bot(exported_twin):
    root, model = exported_twin
    settings = bot_env(
        TWIN_MODEL=str(model),
        TWIN_BACKEND="llama_cpp",
        TWIN_DB=str(root / "data" / "bot.db"),
        TWIN_N_THREADS="2",
        TWIN_PERSONA=OWNER_NAME,
        TWIN_SEED="7",
        TWIN_TEMPERATURE="0",
    )
    yield from running_bot(settings, root / "data", timeout=180)


async def test_the_exported_twin_answers_a_private_message_over_onebot(twin_bot):
    async with twin_bot.client(self_id=OWNER) as client:
        await client.send_private(20001, "在吗，今晚一起吃火锅吗")
        replies = await client.wait_reply(user_id=20001, timeout=120)
    assert replies and any(m.text.strip() for m in replies)


async def test_a_wrong_access_token_is_refused(twin_bot):
    from deploy.onebot_client import OneBotClient

    with pytest.raises(OneBotRefused):
        async with OneBotClient(twin_bot.url, token="not-the-token", self_id=OWNER):
            pass
