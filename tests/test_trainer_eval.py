"""Style metrics as pure functions, and `twin eval` on a tiny trained model (deterministic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.cli import main as twin
from trainer.config import TrainSettings
from trainer.evaluate import EVAL_JSON, EVAL_MD, EVAL_PNG, evaluate, probes
from trainer.style import (
    catchphrase_rate,
    distinct_n,
    face_sticker_rate,
    length_distance,
    no_reply_rate,
    style_distance,
    style_metrics,
    top_catchphrases,
)
from trainer.tiny import cached_tiny_model, fixture_cache_dir
from trainer.train import train

OWNER = ["绝绝子 好耶[贴贴]", "哈哈哈绝绝子", "在的", "[doge]", "好耶", "绝绝子", "明天吧[图片]", "哈哈哈"]


def test_faces_and_stickers_count_but_media_placeholders_do_not():
    assert face_sticker_rate(["好[贴贴]", "看[图片]", "[动画表情]", "嗯"]) == 0.5


def test_silence_is_a_no_reply():
    assert no_reply_rate(["", "  ", "好"]) == pytest.approx(2 / 3, abs=1e-4)


def test_length_distance_is_zero_for_the_same_distribution_and_grows_with_the_gap():
    assert length_distance(["ab", "abc"], ["abc", "ab"]) == 0
    assert length_distance(["a" * 10], ["a"]) == 9
    assert length_distance(["[doge]"], ["x"]) == 0  # a sticker reads as one thing


def test_distinct_n_counts_character_ngrams():
    assert distinct_n(["哈哈哈"], 1) == pytest.approx(1 / 3)
    assert distinct_n(["你好", "你好"], 2) == 0.5


def test_catchphrases_are_the_owners_widespread_phrases():
    phrases = top_catchphrases(OWNER, k=3)

    assert phrases[:2] == ["绝绝子", "哈哈哈"]
    assert catchphrase_rate(["绝绝子!", "好的"], phrases) == 0.5


def test_style_metrics_compare_replies_with_the_owner():
    metrics = style_metrics(["好的呢", "收到", ""], OWNER)

    assert metrics["no_reply_rate"] == pytest.approx(0.3333)
    assert metrics["reference_catchphrase_rate"] > metrics["catchphrase_rate"] == 0
    assert metrics["reference_face_sticker_rate"] == 0.25


def test_a_probe_stops_before_the_last_reply_to_a_friend():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "在吗"},
        {"role": "assistant", "content": "在"},
        {"role": "user", "content": "吃饭？"},
        {"role": "assistant", "content": "好耶"},
    ]
    (probe,) = probes([messages])

    assert probe.messages == messages[:4] and probe.reference == "好耶"


@pytest.fixture(scope="module")
def run_and_data(request, tmp_path_factory) -> tuple[Path, Path]:
    tiny = cached_tiny_model(fixture_cache_dir(request))
    data = tmp_path_factory.mktemp("dataset")
    rows = []
    for i, reply in enumerate(OWNER * 2):
        messages = [
            {"role": "system", "content": "你是小明。"},
            {"role": "user", "content": ["在吗", "吃了吗", "周末呢"][i % 3]},
            {"role": "assistant", "content": reply},
        ]
        rows.append(json.dumps({"messages": messages}, ensure_ascii=False))
    for name in ("train.jsonl", "val.jsonl"):
        (data / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    run = tmp_path_factory.mktemp("runs") / "run"
    train(
        TrainSettings(base_model=str(tiny), data=data, output_dir=run, max_steps=3, lr=5e-3), progress=False
    )
    return run, data


def test_eval_writes_json_markdown_and_plot_and_is_deterministic(run_and_data):
    run, data = run_and_data

    first = evaluate(run, data, max_samples=6, max_new_tokens=6, progress=False)
    saved = json.loads((run / EVAL_JSON).read_text(encoding="utf-8"))
    second = evaluate(run, data, max_samples=6, max_new_tokens=6, progress=False)

    assert first.to_dict() == second.to_dict() == saved
    assert first.samples == 6 and first.base_perplexity > 0 and first.twin_perplexity > 0
    assert first.twin_perplexity != first.base_perplexity  # the adapter is really switched on and off
    summary = (run / EVAL_MD).read_text(encoding="utf-8")
    assert "| held-out perplexity" in summary and "| style distance to owner" in summary
    assert saved["twin_style_distance"] == style_distance(first.twin_style)
    assert (run / EVAL_PNG).read_bytes().startswith(b"\x89PNG")


def test_eval_of_a_run_that_never_finished_is_exit_2(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert twin(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "data")]) == 2
    assert "not a finished training run" in capsys.readouterr().err
