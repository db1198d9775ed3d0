"""`twin backup` / `twin restore`: a checked, secret-free, all-or-nothing copy of a deployment."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from dotenv import dotenv_values

from bot.config import Config
from bot.store import SCHEMA_VERSION, Store, StoredMessage, read_messages_since
from deploy import backup as backup_module
from deploy.backup import MANIFEST_NAME, create_backup, restore_backup
from deploy.cli import main
from pipeline.errors import InputError
from pipeline.registry import current_version, resolve_model
from pipeline.registry_ops import register, switch_current
from tests.gguf_helpers import write_gguf

TOKEN = "tok-Zq81-never-in-a-backup"
DB_KEY = "k3y-Hv02-never-in-a-backup"
API_KEY = "sk-Pw77-never-in-a-backup"
PERSONA = "阿明 # \"quoted\" 'single'"


def _export(tmp: Path, name: str) -> Path:
    export = tmp / "exports" / name
    (export / "adapter").mkdir(parents=True)
    (export / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    write_gguf(export / "model-Q4_K_M.gguf", elements=8 + len(name))
    return export


def deployment(tmp_path: Path, key: str = "", versions: int = 3) -> Path:
    """A bot's directory: `.env`, a store with messages and a generated token, a registry whose
    v2 serves after v1 (so v1 is the rollback target) and a newer v3 never promoted."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)

    async def fill() -> None:
        store = await Store.open(home / "data" / "bot.db", key)
        for i in range(20):
            await store.add(StoredMessage("c2c", "20001", "20001", "incoming", f"消息{i}", 1_700_000_000 + i))
        await store.add(
            StoredMessage("c2c", "20001", "10000", "twin", "在的", 1_700_000_100, model_version="v2")
        )
        await store.close()

    asyncio.run(fill())
    (home / "data" / "onebot-token").write_text(TOKEN + "\n", encoding="utf-8")
    models = home / "models"
    for i in range(1, versions + 1):
        register(models, _export(tmp_path, f"e{i}"), version=f"v{i}")
    switch_current(models, "v1", by="test")
    switch_current(models, "v2", by="test")
    lines = [
        "TWIN_DB=data/bot.db",
        "TWIN_MODEL=models",
        f"ONEBOT_ACCESS_TOKEN={TOKEN}",
        f"TWIN_OPENAI_API_KEY={API_KEY}",
        'SUPERUSERS=["42"]',
        f"TWIN_PERSONA='{PERSONA.replace(chr(39), '')}'",
        "TWIN_PRIVATE_DENY=[30001, 30002]",
    ]
    if key:
        lines.append(f"TWIN_DB_KEY={DB_KEY}")
    (home / ".env").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return home


def settings_of(home: Path, key: str = "") -> Config:
    return Config(twin_db=home / "data" / "bot.db", twin_model=str(home / "models"), twin_db_key=key)


def backup_of(home: Path, out: Path, key: str = "", **kwargs) -> backup_module.BackupManifest:
    raw = {"ONEBOT_ACCESS_TOKEN": TOKEN, "SUPERUSERS": '["42"]', "HOST": "127.0.0.1"}
    return create_backup(settings_of(home, key), out, raw_settings=raw, base=home, **kwargs)


def members(archive: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return tar.getmembers()


def member_bytes(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


def nothing_left_beside(target: Path) -> bool:
    return not target.exists() and [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_a_backup_restores_into_a_directory_the_bot_can_run_from(tmp_path, monkeypatch, capsys) -> None:
    home = deployment(tmp_path)
    monkeypatch.chdir(home)
    for name in [n for n in os.environ if n.startswith(("TWIN_", "ONEBOT_"))]:
        monkeypatch.delenv(name)
    out = tmp_path / "backups" / "twin.tar"

    assert main(["backup", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "models v2 (rollback v1)" in said and "ONEBOT_ACCESS_TOKEN" in said and TOKEN not in said
    assert out.stat().st_mode & 0o777 == 0o600
    names = [m.name for m in members(out)]
    assert names[0] == MANIFEST_NAME
    assert {"settings.env", "data/bot.db", "models/current", "models/history.json"} <= set(names)
    assert "models/v2/model-Q4_K_M.gguf" in names and "models/v1/adapter/adapter_config.json" in names
    assert not any(n.startswith("models/v3") for n in names)  # neither serving nor the rollback target
    assert "data/onebot-token" not in names

    restored = tmp_path / "restored"
    assert main(["restore", str(out), "--to", str(restored)]) == 0
    said = capsys.readouterr().out
    assert f"schema v{SCHEMA_VERSION}, 21 messages, checked" in said and "serving v2" in said
    assert "ONEBOT_ACCESS_TOKEN" in said and "TWIN_OPENAI_API_KEY" in said
    before = read_messages_since(home / "data" / "bot.db", include_approved_twin=True)
    assert read_messages_since(restored / "data" / "bot.db", include_approved_twin=True) == before
    assert current_version(restored / "models") == "v2"
    assert (
        resolve_model(restored / "models").gguf.read_bytes()
        == (home / "models" / "v2" / "model-Q4_K_M.gguf").read_bytes()
    )
    env = dotenv_values(restored / ".env")
    assert env["TWIN_DB"] == "data/bot.db" and env["TWIN_MODEL"] == "models"
    assert env["SUPERUSERS"] == '["42"]' and env["TWIN_PRIVATE_DENY"] == "[30001, 30002]"
    assert env["TWIN_PERSONA"] == PERSONA.replace("'", "")
    assert "ONEBOT_ACCESS_TOKEN" not in env and "TWIN_OPENAI_API_KEY" not in env
    for path in [restored, *restored.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path


def test_settings_survive_the_env_file_whatever_they_hold() -> None:
    tricky = ["a b", " lead", "x#y", "it's", 'say "hi"', "back\\slash", "two\nlines", "$HOME", ""]
    raw = {f"X_{i}": value for i, value in enumerate(tricky)}
    text, _ = backup_module.settings_env(Config(), raw, store="data/bot.db", model="models")
    parsed = dotenv_values(stream=io.StringIO(text))
    assert [parsed[f"X_{i}"] for i in range(len(tricky))] == tricky


def test_an_encrypted_store_stays_encrypted_and_opens_with_its_key(tmp_path) -> None:
    home = deployment(tmp_path, key=DB_KEY)
    out = tmp_path / "twin.tar"
    manifest = backup_of(home, out, key=DB_KEY)
    assert manifest.encrypted
    stored = member_bytes(out, "data/bot.db")
    assert not stored.startswith(b"SQLite format 3") and len(stored) > 4096

    unchecked = restore_backup(out, tmp_path / "no-key")
    assert unchecked.messages is None and "not verified" in unchecked.store_check
    assert "TWIN_DB_KEY" in unchecked.to_set
    checked = restore_backup(out, tmp_path / "with-key", key=DB_KEY)
    assert checked.messages == 21 and checked.store_check.startswith("encrypted")
    assert len(read_messages_since(tmp_path / "with-key" / "data" / "bot.db", key=DB_KEY)) == 20
    with pytest.raises(InputError, match="does not open"):
        restore_backup(out, tmp_path / "wrong-key", key="not-the-key")
    assert nothing_left_beside(tmp_path / "wrong-key")


def test_all_versions_takes_every_version(tmp_path) -> None:
    home = deployment(tmp_path)
    manifest = backup_of(home, tmp_path / "all.tar", all_versions=True)
    assert manifest.versions == ["v1", "v2", "v3"] and manifest.serving == "v2"
    restore_backup(tmp_path / "all.tar", tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r" / "models").iterdir() if p.is_dir()) == ["v1", "v2", "v3"]


def test_no_secret_reaches_the_archive(tmp_path) -> None:
    home = deployment(tmp_path, key=DB_KEY)
    settings = settings_of(home, DB_KEY).model_copy(update={"twin_openai_api_key": API_KEY})
    raw = {"ONEBOT_ACCESS_TOKEN": TOKEN, "ONEBOT_SECRET": "sig-Secret-99", "HOST": "127.0.0.1"}
    # A secret pasted into a setting that is not secret by name is masked there too.
    raw["ONEBOT_WS_URLS"] = f'["ws://u:{TOKEN}@127.0.0.1:3001"]'
    manifest = create_backup(settings, tmp_path / "twin.tar", raw_settings=raw, base=home)
    data = (tmp_path / "twin.tar").read_bytes()
    for secret in (TOKEN, DB_KEY, API_KEY, "sig-Secret-99"):
        assert secret.encode() not in data
    assert manifest.secrets_removed == [
        "ONEBOT_ACCESS_TOKEN",
        "ONEBOT_SECRET",
        "TWIN_DB_KEY",
        "TWIN_OPENAI_API_KEY",
    ]


def test_restore_refuses_a_directory_that_is_not_empty(tmp_path) -> None:
    backup_of(deployment(tmp_path), tmp_path / "twin.tar")
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(InputError, match="not empty"):
        restore_backup(tmp_path / "twin.tar", target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert restore_backup(tmp_path / "twin.tar", tmp_path / "empty").manifest.serving == "v2"


def test_a_tampered_member_is_refused_and_nothing_is_left(tmp_path) -> None:
    backup_of(deployment(tmp_path), tmp_path / "twin.tar")
    with tarfile.open(tmp_path / "twin.tar") as tar:
        offset = tar.getmember("models/v2/model-Q4_K_M.gguf").offset_data
    with (tmp_path / "twin.tar").open("r+b") as handle:
        handle.seek(offset + 40)
        byte = handle.read(1)
        handle.seek(offset + 40)
        handle.write(bytes([byte[0] ^ 0xFF]))
    target = tmp_path / "out" / "restored"
    with pytest.raises(InputError, match="checksum mismatch"):
        restore_backup(tmp_path / "twin.tar", target)
    assert nothing_left_beside(target)


def test_a_truncated_archive_is_refused_and_nothing_is_left(tmp_path) -> None:
    backup_of(deployment(tmp_path), tmp_path / "twin.tar")
    data = (tmp_path / "twin.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    target = tmp_path / "out" / "restored"
    with pytest.raises(InputError, match="truncated"):
        restore_backup(tmp_path / "cut.tar", target)
    assert nothing_left_beside(target)


def hostile_archive(path: Path, name: str, kind: bytes = tarfile.REGTYPE, listed: bool = True, size: int = 4):
    """A backup whose manifest is sound except for one member `name` of type `kind`."""
    body = b"evil"
    files = [{"path": "data/bot.db", "size": 0, "sha256": hashlib.sha256(b"").hexdigest()}]
    if listed:
        files.append({"path": name, "size": size, "sha256": hashlib.sha256(body).hexdigest()})
    manifest = {
        "format": "qq-twin-backup",
        "format_version": 1,
        "created": "now",
        "qq_twin_version": "0",
        "store": "data/bot.db",
        "schema_version": 3,
        "encrypted": False,
        "model": "models",
        "model_kind": "file",
        "files": files,
        "dirs": [],
    }
    with tarfile.open(path, "w") as tar:
        raw = json.dumps(manifest).encode()
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        info = tarfile.TarInfo("data/bot.db")
        tar.addfile(info, io.BytesIO(b""))
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.REGTYPE:
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        else:
            info.linkname = "/etc/passwd"
            tar.addfile(info)


@pytest.mark.parametrize(
    ("name", "kind", "listed", "size", "cause"),
    [
        ("../escaped", tarfile.REGTYPE, True, 4, "leaving the directory"),
        ("/tmp/absolute", tarfile.REGTYPE, True, 4, "absolute"),
        ("../escaped", tarfile.REGTYPE, False, 4, "leaving the directory"),
        ("models/link", tarfile.SYMTYPE, True, 4, "link or special"),
        ("models/hard", tarfile.LNKTYPE, True, 4, "link or special"),
        ("models/dev", tarfile.CHRTYPE, True, 4, "link or special"),
        ("models/extra", tarfile.REGTYPE, False, 4, "not in the manifest"),
        ("models/big", tarfile.REGTYPE, True, 2, "the manifest says 2"),
        ("data/bot.db/inner", tarfile.REGTYPE, True, 4, "collides"),
        ("models/sparse", tarfile.GNUTYPE_SPARSE, True, 4, "link or special"),
    ],
)
def test_hostile_members_are_refused_and_nothing_is_written(
    tmp_path, name, kind, listed, size, cause
) -> None:
    hostile_archive(tmp_path / "evil.tar", name, kind, listed, size)
    target = tmp_path / "out" / "restored"
    with pytest.raises(InputError, match=cause):
        restore_backup(tmp_path / "evil.tar", target)
    assert nothing_left_beside(target)
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/absolute").exists()


def test_a_full_disk_leaves_no_partial_backup(tmp_path, monkeypatch, capsys) -> None:
    home = deployment(tmp_path)
    monkeypatch.chdir(home)
    real = tarfile.TarFile.addfile

    def full(self, info, fileobj=None):
        if info.name.endswith(".gguf"):
            self.fileobj.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    out_dir = tmp_path / "backups"
    assert main(["backup", "-o", str(out_dir / "twin.tar"), "--env-file", str(home / ".env")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no space left on device" in err
    assert list(out_dir.iterdir()) == []


def test_an_incomplete_version_is_not_backed_up(tmp_path) -> None:
    home = deployment(tmp_path)
    (home / "models" / "v1" / "model-Q4_K_M.gguf").unlink()
    with pytest.raises(InputError, match="named in the manifest but missing"):
        backup_of(home, tmp_path / "twin.tar")
    assert not (tmp_path / "twin.tar").exists()


def test_a_link_out_of_the_registry_is_refused(tmp_path) -> None:
    home = deployment(tmp_path)
    outside = write_gguf(tmp_path / "elsewhere.gguf")
    gguf = home / "models" / "v2" / "model-Q4_K_M.gguf"
    gguf.unlink()
    gguf.symlink_to(outside)
    with pytest.raises(InputError, match="outside the registry"):
        backup_of(home, tmp_path / "twin.tar")
    assert list(tmp_path.glob("*.tar")) == [] and list(tmp_path.glob(".twin.tar*")) == []


def with_retrain_inputs(home: Path) -> Config:
    """The deployment's settings with an original dataset and an imported history beside it."""
    dataset = home / "datasets" / "v1"
    (dataset / "mix").mkdir(parents=True)
    for name, text in (("train.jsonl", '{"messages": []}\n'), ("val.jsonl", ""), ("report.json", "{}")):
        (dataset / name).write_text(text, encoding="utf-8")
    (dataset / "mix" / "general.jsonl").write_text("{}\n", encoding="utf-8")
    (home / "messages.jsonl").write_text('{"msg_id": "1"}\n', encoding="utf-8")
    return settings_of(home).model_copy(
        update={"twin_retrain_dataset": Path("datasets/v1"), "twin_examples_messages": Path("messages.jsonl")}
    )


def test_the_retrain_inputs_are_backed_up_and_the_restored_settings_point_at_them(tmp_path) -> None:
    home = deployment(tmp_path)
    manifest = create_backup(with_retrain_inputs(home), tmp_path / "twin.tar", base=home)
    assert manifest.dataset == "dataset" and manifest.examples_messages == "imports/messages.jsonl"
    assert manifest.not_included == []

    restored = tmp_path / "restored"
    restore_backup(tmp_path / "twin.tar", restored)
    for name in ("train.jsonl", "val.jsonl", "report.json", "mix/general.jsonl"):
        assert (restored / "dataset" / name).read_bytes() == (home / "datasets" / "v1" / name).read_bytes()
    assert (restored / "imports" / "messages.jsonl").read_bytes() == (home / "messages.jsonl").read_bytes()
    env = dotenv_values(restored / ".env")
    assert env["TWIN_RETRAIN_DATASET"] == "dataset"
    assert env["TWIN_EXAMPLES_MESSAGES"] == "imports/messages.jsonl"


def test_a_retrain_input_that_is_not_there_is_named_and_the_backup_still_runs(tmp_path) -> None:
    home = deployment(tmp_path)
    settings = settings_of(home).model_copy(
        update={"twin_retrain_dataset": Path("gone"), "twin_examples_messages": Path("gone.jsonl")}
    )
    manifest = create_backup(settings, tmp_path / "twin.tar", base=home)
    assert manifest.dataset is None and manifest.examples_messages is None
    assert manifest.not_included == ["TWIN_RETRAIN_DATASET", "TWIN_EXAMPLES_MESSAGES"]
    env = dotenv_values(stream=io.StringIO(member_bytes(tmp_path / "twin.tar", "settings.env").decode()))
    assert env["TWIN_RETRAIN_DATASET"] == str(home / "gone")  # still its original place


def test_a_link_out_of_the_dataset_is_refused(tmp_path) -> None:
    home = deployment(tmp_path)
    settings = with_retrain_inputs(home)
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("not the dataset's", encoding="utf-8")
    (home / "datasets" / "v1" / "extra.jsonl").symlink_to(secret)
    with pytest.raises(InputError, match=r"outside the dataset \(TWIN_RETRAIN_DATASET\)"):
        create_backup(settings, tmp_path / "twin.tar", base=home)
    assert not (tmp_path / "twin.tar").exists()


def test_a_manifest_naming_a_dataset_it_does_not_hold_is_refused(tmp_path) -> None:
    home = deployment(tmp_path)
    create_backup(with_retrain_inputs(home), tmp_path / "twin.tar", base=home)
    with tarfile.open(tmp_path / "twin.tar") as tar:
        manifest = json.loads(tar.extractfile(MANIFEST_NAME).read())  # type: ignore[union-attr]
    manifest["dirs"].remove("dataset")
    with pytest.raises(InputError, match="names a dataset it does not hold"):
        backup_module.BackupManifest.from_json(json.dumps(manifest).encode(), tmp_path / "twin.tar")
