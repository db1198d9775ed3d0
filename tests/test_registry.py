"""The model registry: register, promote, roll back, keep the last K, list through `twin models`."""

from __future__ import annotations

import json
import threading

import pytest

from deploy.cli import main as twin
from pipeline.errors import InputError
from pipeline.registry import (
    CURRENT_FILE,
    HISTORY_FILE,
    current_version,
    list_versions,
    previous_version,
    read_history,
    resolve_model,
)
from pipeline.registry_ops import RetrainBusy, promote, prune, register, retrain_lock, rollback
from tests.gguf_helpers import write_gguf


def _export(tmp_path, name="export", quants=("Q4_K_M",), base="tiny-base"):
    """What `twin export` leaves behind: GGUF file(s), an adapter, and its manifest."""
    d = tmp_path / name
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_config.json").write_text("{}")
    for q in quants:
        write_gguf(d / f"model-{q}.gguf")
    (d / "manifest.json").write_text(json.dumps({"base": base, "quantisation": list(quants)}))
    return d


def _registry_with(tmp_path, n):
    reg = tmp_path / "models"
    for i in range(n):
        v = register(reg, _export(tmp_path, f"e{i}"), eval_numbers={"perplexity": 10.0 - i})
        promote(reg, v.name)
    return reg


def test_register_writes_a_full_manifest_and_copies_the_export(tmp_path):
    reg = tmp_path / "models"
    window = {"since": 100, "until": 200, "samples": 42}
    v = register(
        reg,
        _export(tmp_path),
        parent="v0001",
        data_window=window,
        dataset_hash="abc",
        eval_numbers={"perplexity": 3.5, "style_distance": 0.1},
    )
    assert v.name == "v0001"
    manifest = json.loads((reg / "v0001" / "manifest.json").read_text())
    assert manifest["base"] == "tiny-base"  # the export's own fields survive
    assert manifest["parent"] == "v0001"
    assert manifest["data_window"] == window
    assert manifest["dataset_hash"] == "abc"
    assert manifest["eval"]["perplexity"] == 3.5
    assert manifest["created"]
    assert manifest["gguf"] == {"Q4_K_M": "model-Q4_K_M.gguf"}
    assert (reg / "v0001" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "export" / "model-Q4_K_M.gguf").is_file()  # copied, not moved
    assert current_version(reg) is None  # registering does not serve


def test_an_exported_models_eval_json_numbers_show_as_its_perplexity_and_style(tmp_path):
    export = _export(tmp_path)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["eval"] = {"twin_perplexity": 4.25, "twin_style_distance": 0.3, "base_perplexity": 9.0}
    (export / "manifest.json").write_text(json.dumps(manifest))

    v = register(tmp_path / "models", export)

    assert v.eval["perplexity"] == 4.25 and v.eval["style_distance"] == 0.3


def test_versions_are_numbered_in_order(tmp_path):
    reg = tmp_path / "models"
    names = [register(reg, _export(tmp_path, f"e{i}")).name for i in range(3)]
    assert names == ["v0001", "v0002", "v0003"]
    assert [v.name for v in list_versions(reg)] == names


def test_an_export_without_gguf_is_refused_and_nothing_is_registered(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(InputError, match=r"no \.gguf"):
        register(tmp_path / "models", bad)
    assert list_versions(tmp_path / "models") == []


def test_promote_switches_current_atomically_and_the_bot_resolves_it(tmp_path):
    reg = _registry_with(tmp_path, 2)
    assert current_version(reg) == "v0002"
    assert resolve_model(reg).gguf == reg / "v0002" / "model-Q4_K_M.gguf"
    promote(reg, "v0001")
    assert (reg / CURRENT_FILE).read_text().strip() == "v0001"
    assert not [p.name for p in reg.iterdir() if p.name.endswith(".tmp")]


def test_promoting_a_missing_version_is_a_clear_error_and_changes_nothing(tmp_path):
    reg = _registry_with(tmp_path, 1)
    with pytest.raises(InputError, match="no such model version"):
        promote(reg, "v0042")
    assert current_version(reg) == "v0001"


def test_a_corrupt_manifest_is_a_clear_error(tmp_path):
    reg = _registry_with(tmp_path, 2)
    (reg / "v0001" / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"v0001/manifest.json: corrupt manifest"):
        promote(reg, "v0001")
    with pytest.raises(InputError, match="corrupt manifest"):
        list_versions(reg)
    assert current_version(reg) == "v0002"


def test_rollback_returns_to_the_previous_promoted_version_and_walks_back(tmp_path):
    reg = _registry_with(tmp_path, 3)
    assert previous_version(reg) == "v0002"
    assert rollback(reg).name == "v0002"
    assert current_version(reg) == "v0002"
    assert rollback(reg).name == "v0001"
    with pytest.raises(InputError, match="no earlier promoted version"):
        rollback(reg)
    assert current_version(reg) == "v0001"
    actions = [(e.action, e.version, e.previous) for e in read_history(reg)]
    assert actions[-2:] == [("rollback", "v0002", "v0003"), ("rollback", "v0001", "v0002")]


def test_rollback_after_a_new_promotion_returns_to_the_one_before_it(tmp_path):
    reg = _registry_with(tmp_path, 3)
    rollback(reg)  # v0003 → v0002
    promote(reg, "v0003")
    assert rollback(reg).name == "v0002"


def test_keep_k_deletes_the_oldest_but_never_current_or_previous(tmp_path):
    reg = _registry_with(tmp_path, 5)
    promote(reg, "v0001")  # serve the oldest; v0005 becomes previous
    register(reg, _export(tmp_path, "e6"))
    removed = prune(reg, keep=2)
    assert sorted(removed) == ["v0002", "v0003", "v0004"]
    assert [v.name for v in list_versions(reg)] == ["v0001", "v0005", "v0006"]
    assert current_version(reg) == "v0001"
    assert previous_version(reg) == "v0005"


def test_a_second_retrain_lock_is_refused_at_once(tmp_path):
    reg = tmp_path / "models"
    with retrain_lock(reg):
        errors: list[Exception] = []

        def second():
            try:
                with retrain_lock(reg):
                    pass
            except RetrainBusy as exc:
                errors.append(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join(5)
        assert errors and "already running" in str(errors[0])
    with retrain_lock(reg):  # released after the cycle
        pass


def test_twin_models_lists_promotes_and_rolls_back(tmp_path, capsys):
    reg = _registry_with(tmp_path, 2)
    assert twin(["models", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert "v0001" in out and "v0002" in out and "●" in out and "9.00" in out
    assert twin(["models", "rollback", "--registry", str(reg)]) == 0
    assert "v0002 → v0001" in capsys.readouterr().out
    assert twin(["models", "promote", "v0002", "--registry", str(reg)]) == 0
    assert current_version(reg) == "v0002"
    assert json.loads((reg / HISTORY_FILE).read_text())[-1]["action"] == "promote"


def test_twin_models_promote_of_an_unknown_version_exits_2_with_one_line(tmp_path, capsys):
    reg = _registry_with(tmp_path, 1)
    assert twin(["models", "promote", "v0099", "--registry", str(reg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twin: error: ") and "v0099" in err[0]


@pytest.mark.parametrize("name", ["../v0001", "v0001/../v0002", ".hidden", "current"])
def test_twin_models_promote_of_a_path_is_refused_in_one_line_and_changes_nothing(tmp_path, capsys, name):
    reg = _registry_with(tmp_path, 2)
    history = (reg / HISTORY_FILE).read_text()
    assert twin(["models", "promote", name, "--registry", str(reg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"twin: error: {reg}")
    assert current_version(reg) == "v0002" and (reg / HISTORY_FILE).read_text() == history


def test_twin_models_promote_of_a_truncated_model_is_refused(tmp_path, capsys):
    reg = _registry_with(tmp_path, 2)
    gguf = reg / "v0001" / "model-Q4_K_M.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-8])
    assert twin(["models", "promote", "v0001", "--registry", str(reg)]) == 2
    assert "model-Q4_K_M.gguf: truncated" in capsys.readouterr().err
    assert current_version(reg) == "v0002"


def test_the_retrain_promotion_and_the_cli_record_who_switched(tmp_path):
    reg = _registry_with(tmp_path, 2)
    promote(reg, "v0001", reason="retrain gate passed", by="retrain")
    rollback(reg)
    assert [(e.action, e.version, e.by) for e in read_history(reg)][-2:] == [
        ("promote", "v0001", "retrain"),
        ("rollback", "v0002", "cli"),
    ]
