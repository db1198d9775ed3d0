"""`twin backup` and `twin restore`: the store, the serving model versions and the settings in one
checked archive, and back into a runnable directory.

An archive is an uncompressed tar (GGUFs are already dense, so gzip would spend the bot's cores for
nothing), `manifest.json` first, then::

    settings.env                  the settings without secrets (restored as `.env`)
    data/<store>                  the store, copied with SQLite's online backup (SQLCipher: still encrypted)
    models/current, history.json, retrain-status.json, <version>/...   the registry's serving version
                                  and its rollback target (every version with --all-versions)
    dataset/...                   the original dataset (TWIN_RETRAIN_DATASET), when set
    imports/<file>                the imported history (TWIN_EXAMPLES_MESSAGES), when set

The manifest names every member with its size and sha256; restore takes nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, BinaryIO, Protocol

import typer

from pipeline.errors import InputError
from pipeline.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, atomic_path, fsync_dir

commands = typer.Typer()

FORMAT = "qq-twin-backup"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SETTINGS_NAME = "settings.env"
RESTORED_SETTINGS = ".env"  # where restore puts settings.env: what `twin serve` in the directory reads
STORE_DIR = "data"
MODELS_DIR = "models"
DATASET_DIR = "dataset"
IMPORTS_DIR = "imports"
MAX_MANIFEST_BYTES = 16 * 2**20
CHUNK = 2**20
# Pages per step of SQLite's online backup; the copy reads one snapshot (WAL: writers never wait).
BACKUP_PAGES = 1024
# NoneBot's own settings taken from the environment (the `.env` files are taken whole).
NONEBOT_SETTINGS = (
    "DRIVER",
    "HOST",
    "PORT",
    "SUPERUSERS",
    "NICKNAME",
    "COMMAND_START",
    "COMMAND_SEP",
    "LOG_LEVEL",
    "ENVIRONMENT",
    "API_TIMEOUT",
    "SESSION_EXPIRE_TIMEOUT",
    "ONEBOT_WS_URLS",
    "ONEBOT_API_TIMEOUT",
)
TOKEN_SETTING = "ONEBOT_ACCESS_TOKEN"
KEY_SETTING = "TWIN_DB_KEY"


class Meter(Protocol):
    """Where byte counts of long copies go (the CLI's progress bar)."""

    def start(self, what: str, total: int) -> None: ...

    def advance(self, count: int) -> None: ...


class _Silent:
    def start(self, what: str, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass


@dataclass(slots=True)
class Member:
    """One file of the archive: its path there, size and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(slots=True)
class BackupManifest:
    """What an archive holds (its `manifest.json`)."""

    created: str
    qq_twin_version: str
    store: str  # archive path of the store
    schema_version: int
    encrypted: bool
    model: str  # archive path TWIN_MODEL points at
    model_kind: str  # registry | directory | file
    serving: str | None = None
    rollback_target: str | None = None
    versions: list[str] = field(default_factory=list)
    all_versions: bool = False
    secrets_removed: list[str] = field(default_factory=list)
    files: list[Member] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    dataset: str | None = None  # archive path TWIN_RETRAIN_DATASET points at (absent: not set)
    examples_messages: str | None = None  # archive path of TWIN_EXAMPLES_MESSAGES
    not_included: list[str] = field(default_factory=list)  # settings naming what was not there

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: bytes, where: Path) -> BackupManifest:
        """Parse and check an archive's manifest (hostile input): every path plain and relative."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(where, f"manifest.json is not JSON ({exc}); not a qq-twin backup") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(where, "manifest.json is not a qq-twin backup manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise InputError(
                where, f"backup format {data.get('format_version')!r}, this qq-twin reads {FORMAT_VERSION}"
            )
        try:
            files = [Member(str(m["path"]), int(m["size"]), str(m["sha256"])) for m in data["files"]]
            manifest = cls(
                **{k: data[k] for k in cls.__dataclass_fields__ if k in data and k not in ("files",)},
            )
            manifest.files = files
            manifest.dirs = [str(d) for d in data.get("dirs", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(where, f"manifest.json is malformed ({exc})") from None
        kinds_ok = (
            isinstance(manifest.store, str)
            and isinstance(manifest.model, str)
            and isinstance(manifest.schema_version, int)
            and isinstance(manifest.encrypted, bool)
            and manifest.model_kind in ("registry", "directory", "file")
            and isinstance(manifest.serving, (str, type(None)))
            and all(isinstance(n, str) for n in [*manifest.versions, *manifest.secrets_removed])
            and isinstance(manifest.dataset, (str, type(None)))
            and isinstance(manifest.examples_messages, (str, type(None)))
            and isinstance(manifest.not_included, list)
            and all(isinstance(n, str) for n in manifest.not_included)
        )
        if not kinds_ok:
            raise InputError(where, "manifest.json is malformed (a field of the wrong type)")
        paths = [m.path for m in files]
        for path in [*paths, *manifest.dirs, manifest.model]:
            _checked_path(path, where)
        if manifest.dataset is not None and manifest.dataset not in manifest.dirs:
            raise InputError(where, "manifest.json names a dataset it does not hold")
        if manifest.examples_messages is not None and manifest.examples_messages not in paths:
            raise InputError(where, "manifest.json names an imported history it does not hold")
        if len(set(paths) | set(manifest.dirs)) != len(paths) + len(manifest.dirs):
            raise InputError(where, "manifest.json names a path twice")
        if RESTORED_SETTINGS in paths or manifest.store not in paths:
            raise InputError(where, "manifest.json does not describe a qq-twin backup's files")
        for member in files:
            if member.size < 0 or len(member.sha256) != 64:
                raise InputError(where, f"manifest.json: bad size or checksum for {member.path!r}")
        return manifest


@dataclass(slots=True)
class RestoreResult:
    """A restored directory and what was checked there."""

    directory: Path
    manifest: BackupManifest
    store_check: str  # one line: what was verified about the store
    messages: int | None  # rows in the restored store (None: encrypted and no key to read it)
    to_set: list[str]  # secrets the operator must put back into `.env`


# ------------------------------------------------------------------------------------------ backup


def create_backup(
    settings: object,
    out: str | Path,
    all_versions: bool = False,
    *,
    raw_settings: Mapping[str, str | None] | None = None,
    base: Path = Path(),
    meter: Meter | None = None,
) -> BackupManifest:
    """Write a backup of the deployment `settings` (a `bot.config.Config`) to `out`, all or nothing.

    `raw_settings` are the deployment's other settings (NoneBot's, upper-case names); relative paths
    are taken from `base` (where the bot runs)."""
    meter = meter or _Silent()
    out = Path(out)
    if out.is_dir():
        raise InputError(out, "is a directory; give the backup file's name (-o twin-backup.tar)")
    db = _under(base, Path(settings.twin_db))
    if not db.is_file():
        raise InputError(db, "no conversation store here (TWIN_DB); nothing to back up")
    files, dirs, model = _model_plan(_under(base, Path(settings.twin_model)), all_versions)
    inputs = _inputs_plan(settings, base, files, dirs)
    out.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        store_member = f"{STORE_DIR}/{db.name}"
        version = _copy_store(db, staging / db.name, settings.twin_db_key, out)
        text, removed = settings_env(
            settings,
            raw_settings or {},
            store=store_member,
            model=model["model"],
            base=base,
            dataset=inputs["dataset"],
            examples_messages=inputs["examples_messages"],
        )
        (staging / SETTINGS_NAME).write_text(text, encoding="utf-8")
        sources = [
            (SETTINGS_NAME, staging / SETTINGS_NAME),
            (store_member, staging / db.name),
            *files,
        ]
        manifest = BackupManifest(
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            qq_twin_version=_qq_twin_version(),
            store=store_member,
            schema_version=version,
            encrypted=bool(settings.twin_db_key),
            secrets_removed=removed,
            dirs=[STORE_DIR, *dirs],
            all_versions=all_versions,
            **{k: v for k, v in model.items() if k != "model"},
            model=model["model"],
            **inputs,
        )
        meter.start("checksums", sum(source.stat().st_size for _, source in sources))
        manifest.files = [_member(path, source, meter) for path, source in sources]
        _write_archive(out, manifest, sources, meter)
    except sqlite3.Error as exc:
        if "full" in str(exc):
            raise InputError(out, "no space left on device; the backup was not written") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _inputs_plan(settings: object, base: Path, files: list, dirs: list) -> dict:
    """The original dataset and the imported history, when the settings name them: a restored
    deployment retrains (replay, held-out set, build settings) and indexes examples as before.
    A setting naming nothing there is recorded as not included (the backup still runs)."""
    plan: dict = {"dataset": None, "examples_messages": None, "not_included": []}
    dataset = getattr(settings, "twin_retrain_dataset", None)
    if dataset is not None:
        path = _under(base, Path(dataset))
        if path.is_dir():
            _walk(path, path.resolve(), DATASET_DIR, files, dirs, "the dataset (TWIN_RETRAIN_DATASET)")
            plan["dataset"] = DATASET_DIR
        else:
            plan["not_included"].append("TWIN_RETRAIN_DATASET")
    imported = getattr(settings, "twin_examples_messages", None)
    if imported is not None:
        path = _under(base, Path(imported))
        if path.is_file():
            member = f"{IMPORTS_DIR}/{path.name}"
            dirs.append(IMPORTS_DIR)
            files.append((member, _inside(path.resolve(), path.resolve())))  # its content, linked or not
            plan["examples_messages"] = member
        else:
            plan["not_included"].append("TWIN_EXAMPLES_MESSAGES")
    return plan


def _under(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path


def _qq_twin_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qq-twin")
    except PackageNotFoundError:
        return "unknown"


def _copy_store(db: Path, dest: Path, key: str, out: Path) -> int:
    """The store as of one moment, through SQLite's online backup (the WAL included); its schema version.

    The source is opened read-only and read inside one transaction, so the copy is one snapshot
    and, under WAL, the running bot's writes never wait; SQLCipher stores are copied into a
    database keyed the same, so the copy stays encrypted."""
    from bot.store import connect, schema_version

    try:
        source = connect(db, key, read_only=True)
    except Exception as exc:  # sqlite3's or sqlcipher3's errors
        raise InputError(db, f"cannot open the store ({exc})") from None
    try:
        try:
            source.execute("BEGIN")
            version = schema_version(source)  # the snapshot starts here
        except Exception as exc:
            hint = "; is TWIN_DB_KEY right?" if "not a database" in str(exc) else ""
            raise InputError(db, f"cannot read the store ({exc}){hint}") from None
        target = connect(dest, key)
        try:
            source.backup(target, pages=BACKUP_PAGES, sleep=0.005)  # type: ignore[arg-type]
        finally:
            target.close()
        source.execute("COMMIT")
    finally:
        source.close()
    os.chmod(dest, PRIVATE_FILE_MODE)
    return version


def _model_plan(model: Path, all_versions: bool) -> tuple[list[tuple[str, Path]], list[str], dict]:
    """What of TWIN_MODEL goes in: (archive path, file) pairs, directories, and the manifest's model part."""
    from pipeline import registry as reg

    files: list[tuple[str, Path]] = []
    dirs: list[str] = [MODELS_DIR]
    if model.is_file():
        files.append((f"{MODELS_DIR}/{model.name}", model))
        return files, dirs, {"model": f"{MODELS_DIR}/{model.name}", "model_kind": "file"}
    if not model.is_dir():
        raise InputError(model, "no such model file or registry (TWIN_MODEL)")
    root = model.resolve()
    if not (model / reg.CURRENT_FILE).is_file():
        _check_complete(model, reg.read_manifest(model))
        _walk(model, root, f"{MODELS_DIR}/{model.name}", files, dirs)
        return files, dirs, {"model": f"{MODELS_DIR}/{model.name}", "model_kind": "directory"}
    serving = reg.current_version(model)
    if serving is None:
        raise InputError(model / reg.CURRENT_FILE, "names no version; nothing is serving")
    rollback = reg.previous_version(model)
    chosen = [serving, *([rollback] if rollback else [])]
    versions = reg.version_names(model) if all_versions else chosen
    for name in (reg.CURRENT_FILE, reg.HISTORY_FILE, reg.STATUS_FILE):
        if (model / name).exists() or (model / name).is_symlink():
            files.append((f"{MODELS_DIR}/{name}", _inside(model / name, root)))
    for name in versions:
        path = reg.version_dir(model, name)
        _check_complete(path, reg.read_manifest(path))
        _walk(path, root, f"{MODELS_DIR}/{name}", files, dirs)
    plan = {
        "serving": serving,
        "rollback_target": rollback,
        "versions": sorted(versions, key=reg.version_sort_key),
    }
    return files, dirs, {"model": MODELS_DIR, "model_kind": "registry", **plan}


def _check_complete(path: Path, manifest: dict) -> None:
    """Refuse a version whose manifest names files that are not there (a half-copied version)."""
    named = [*dict(manifest.get("gguf") or {}).values(), manifest.get("lora_gguf"), manifest.get("adapter")]
    for name in named:
        if name is None:
            continue
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise InputError(path / "manifest.json", f"names {name!r}, which is not a file of the version")
        if not (path / name).exists():
            raise InputError(
                path / name, "named in the manifest but missing; refusing to back up this version"
            )


def _inside(path: Path, root: Path, what: str = "the registry") -> Path:
    """`path` itself, or the file it links to when that is inside `root`; a link out is refused."""
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root):
            raise InputError(path, f"is a link to {target}, outside {what}; refusing to back it up")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise InputError(path, "is not a regular file; refusing to back it up")
    return path


def _walk(
    directory: Path, root: Path, prefix: str, files: list, dirs: list, what: str = "the registry"
) -> None:
    dirs.append(prefix)
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            _walk(entry, root, f"{prefix}/{entry.name}", files, dirs, what)
        elif entry.is_symlink() and entry.is_dir():
            raise InputError(entry, "is a link to a directory; refusing to back it up")
        else:
            files.append((f"{prefix}/{entry.name}", _inside(entry, root, what)))


def _member(path: str, source: Path, meter: Meter) -> Member:
    digest, size = hashlib.sha256(), 0
    with source.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            meter.advance(len(chunk))
    return Member(path, size, digest.hexdigest())


class _Hashing:
    """A file read through tarfile that hashes what it hands out."""

    def __init__(self, handle: BinaryIO, meter: Meter) -> None:
        self.handle, self.meter, self.digest, self.size = handle, meter, hashlib.sha256(), 0

    def read(self, count: int = -1) -> bytes:
        data = self.handle.read(count)
        self.digest.update(data)
        self.size += len(data)
        self.meter.advance(len(data))
        return data


def _write_archive(
    out: Path, manifest: BackupManifest, sources: list[tuple[str, Path]], meter: Meter
) -> None:
    """The tar under a temp name beside `out`, fsynced, 0600, renamed; each file re-hashed as it is
    written, so a file changed since its checksum fails the backup instead of storing a mismatch."""
    meter.start("archive", sum(m.size for m in manifest.files))
    now = int(time.time())
    with atomic_path(out) as tmp, tmp.open("wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = CHUNK
            body = manifest.to_json().encode("utf-8")
            tar.addfile(_info(MANIFEST_NAME, len(body), now), _Bytes(body))
            for path in manifest.dirs:
                info = _info(path, 0, now)
                info.type, info.mode = tarfile.DIRTYPE, PRIVATE_DIR_MODE
                tar.addfile(info)
            for member, (_, source) in zip(manifest.files, sources, strict=True):
                with source.open("rb") as raw:
                    reader = _Hashing(raw, meter)
                    try:
                        tar.addfile(_info(member.path, member.size, now), reader)  # type: ignore[arg-type]
                    except OSError as exc:
                        if "unexpected end of data" not in str(exc):
                            raise
                        reader.size = -1
                if reader.size != member.size or reader.digest.hexdigest() != member.sha256:
                    raise InputError(source, "changed while it was being backed up; run the backup again")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(out.parent)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, count: int = -1) -> bytes:
        end = len(self.data) if count < 0 else self.pos + count
        chunk, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return chunk


def _info(path: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.size, info.mode, info.mtime = size, PRIVATE_FILE_MODE, mtime
    return info


# ---------------------------------------------------------------------------- settings, no secrets


def settings_env(
    settings: object,
    raw: Mapping[str, str | None],
    *,
    store: str,
    model: str,
    base: Path = Path(),
    dataset: str | None = None,
    examples_messages: str | None = None,
) -> tuple[str, list[str]]:
    """The settings as a `.env` for the restored directory, every secret left out; and the secrets'
    names that had a value. Paths point into the restored directory."""
    from bot.log_mask import PLACEHOLDER_VALUES, SecretMask, is_secret_setting, secret_values

    values = {
        name.upper(): value or "" for name, value in raw.items() if not name.upper().startswith("TWIN_")
    }
    for name, value in settings.model_dump(mode="json").items():  # type: ignore[attr-defined]
        values[name.upper()] = _env_text(value)
    values["TWIN_DB"], values["TWIN_MODEL"] = store, model
    for name, inside in (("TWIN_RETRAIN_DATASET", dataset), ("TWIN_EXAMPLES_MESSAGES", examples_messages)):
        if inside is not None:
            values[name] = inside
        elif values.get(name) and not Path(values[name]).is_absolute():
            values[name] = str((base / values[name]).absolute())  # not in it: keep pointing at it
    secret = {name for name in values if is_secret_setting(name)}
    removed = sorted(n for n in secret if values[n].strip() and values[n].strip() not in PLACEHOLDER_VALUES)
    # A secret pasted into another setting (a URL with a password) is masked there too.
    mask = SecretMask(secret_values({**values, **{n.upper(): v or "" for n, v in raw.items()}}))
    lines = [
        "# qq-twin settings from a backup (`twin backup`). Secrets are not in it: set",
        f"# {', '.join(sorted({*removed, TOKEN_SETTING}))} here again before `twin serve`.",
    ]
    lines += [f"{name}={_quoted(mask(values[name]))}" for name in sorted(values) if name not in secret]
    return "\n".join(lines) + "\n", removed


def _env_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _quoted(value: str) -> str:
    """A value python-dotenv (NoneBot's reader) reads back exactly."""
    plain = value == value.strip() and not any(c in value for c in "#'\"\\\n\r ") and "$" not in value
    if plain:
        return value
    if "'" not in value and "\n" not in value and "\r" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def deployment_settings(env_file: Path | None) -> dict[str, str | None]:
    """The deployment's settings files (`env_file`, else ./.env and .env.{ENVIRONMENT}) with the
    environment's NoneBot settings over them; names upper-case."""
    from dotenv import dotenv_values

    from bot.config import env_files

    files = [env_file] if env_file is not None else list(env_files(os.environ, Path()))
    merged: dict[str, str | None] = {}
    for path in files:
        if path.is_file():
            merged.update({k.upper(): v for k, v in dotenv_values(path, encoding="utf-8").items()})
    merged.update({k.upper(): v for k, v in os.environ.items() if k.upper() in NONEBOT_SETTINGS})
    return merged


# ----------------------------------------------------------------------------------------- restore


def restore_backup(
    archive: str | Path, to: str | Path, *, key: str = "", meter: Meter | None = None
) -> RestoreResult:
    """Unpack a backup into the new or empty directory `to`, checking every member against the
    manifest, then the store (with `key` when encrypted) and the registry; nothing is left on failure."""
    archive, to = Path(archive), Path(to).absolute()
    meter = meter or _Silent()
    if to.is_symlink() or (to.exists() and (not to.is_dir() or any(to.iterdir()))):
        raise InputError(to, "exists and is not empty; restore only into a new or empty directory")
    if not archive.is_file():
        raise InputError(archive, "no such backup file")
    to.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", suffix=".restoring", dir=to.parent))
    try:
        manifest = _extract(archive, staging, meter)
        result = _verify(archive, staging, manifest, key)
        os.replace(staging, to)  # over an empty directory too (rename(2))
        fsync_dir(to.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.directory = to
    return result


def _checked_path(name: object, where: Path) -> str:
    """A member name safe to create under the restore directory: relative, plain components only."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise InputError(where, f"refusing member {name!r}: not a plain relative path")
    if name.startswith("/") or any(part in ("..", ".", "") for part in name.split("/")):
        raise InputError(where, f"refusing member {name!r}: an absolute path or one leaving the directory")
    return name


def _extract(archive: Path, staging: Path, meter: Meter) -> BackupManifest:
    from bot.store import SCHEMA_VERSION

    try:
        with tarfile.open(archive, mode="r|") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST_NAME or not first.isfile():
                raise InputError(archive, "does not start with manifest.json; not a qq-twin backup")
            if first.size > MAX_MANIFEST_BYTES:
                raise InputError(archive, f"manifest.json is {first.size} bytes; refusing it")
            manifest = BackupManifest.from_json(_read_member(tar, first), archive)
            if manifest.schema_version > SCHEMA_VERSION:
                raise InputError(
                    archive,
                    f"its store has schema v{manifest.schema_version}, newer than this qq-twin "
                    f"(v{SCHEMA_VERSION}); upgrade qq-twin before restoring",
                )
            expected = {m.path: m for m in manifest.files}
            meter.start("restore", sum(m.size for m in manifest.files))
            seen: set[str] = set()
            for info in tar:
                if info is first:  # a streaming TarFile's iteration starts from its first member again
                    continue
                name = _checked_path(info.name, archive)
                if name in seen:
                    raise InputError(archive, f"member {name!r} appears twice")
                seen.add(name)
                if info.isdir() and name in manifest.dirs:
                    _mkdirs(staging, name, archive)
                elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and name in expected:
                    _extract_file(tar, info, expected[name], staging, archive, meter)
                elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.isdir():
                    raise InputError(archive, f"member {name!r} is not in the manifest; refusing the archive")
                else:
                    raise InputError(
                        archive, f"member {name!r} is a link or special file; a backup holds only files"
                    )
    except tarfile.TarError as exc:
        raise InputError(archive, f"not a readable backup archive ({exc}); truncated or damaged?") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise InputError(
            archive, f"truncated: {len(missing)} file(s) of the manifest missing ({missing[0]}…)"
        )
    return manifest


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    assert handle is not None  # a regular file
    return handle.read()


def _mkdirs(staging: Path, name: str, archive: Path) -> Path:
    path = staging
    for part in name.split("/"):
        path = path / part
        try:
            path.mkdir(mode=PRIVATE_DIR_MODE)
        except (FileExistsError, NotADirectoryError):
            if path.is_symlink() or not path.is_dir():
                raise InputError(archive, f"member {name!r} collides with a file") from None
    return path


def _extract_file(
    tar: tarfile.TarFile, info: tarfile.TarInfo, member: Member, staging: Path, archive: Path, meter: Meter
) -> None:
    if info.size != member.size:
        raise InputError(archive, f"{member.path}: {info.size} bytes, the manifest says {member.size}")
    parent, leaf = member.path.rpartition("/")[::2]
    directory = _mkdirs(staging, parent, archive) if parent else staging
    target = directory / (RESTORED_SETTINGS if member.path == SETTINGS_NAME else leaf)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, PRIVATE_FILE_MODE)
    except (FileExistsError, NotADirectoryError):
        raise InputError(archive, f"member {member.path!r} collides with another") from None
    digest = hashlib.sha256()
    source = tar.extractfile(info)
    assert source is not None
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            meter.advance(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != member.sha256:
        raise InputError(archive, f"{member.path}: checksum mismatch; the archive is damaged or was altered")


def _verify(archive: Path, root: Path, manifest: BackupManifest, key: str) -> RestoreResult:
    """The restored store opens (and passes SQLite's quick check) and the registry's `current` resolves."""
    from bot.log_mask import is_secret_setting
    from bot.store import connect, schema_version
    from pipeline.registry import resolve_model

    to_set = sorted({*(n for n in manifest.secrets_removed if is_secret_setting(n)), TOKEN_SETTING})
    db = root / manifest.store
    messages = None
    if manifest.encrypted and not key:
        check = "encrypted; not verified (set TWIN_DB_KEY in the environment to check it)"
        to_set = sorted({*to_set, KEY_SETTING})
    else:
        try:
            with contextlib.closing(connect(db, key if manifest.encrypted else "")) as conn:
                version = schema_version(conn)
                ok = conn.execute("PRAGMA quick_check").fetchone()[0]
                messages = int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        except Exception as exc:  # sqlite3's or sqlcipher3's errors
            hint = " (is TWIN_DB_KEY the store's key?)" if manifest.encrypted else ""
            raise InputError(archive, f"the restored store does not open: {exc}{hint}") from None
        if ok != "ok" or version != manifest.schema_version:
            raise InputError(archive, f"the restored store fails its check ({ok}, schema v{version})")
        check = f"schema v{version}, {messages} messages, checked"
        if manifest.encrypted:
            check = f"encrypted, {check}"
            to_set = sorted({*to_set, KEY_SETTING})
    if manifest.model_kind == "registry":
        try:
            serving = resolve_model(root / manifest.model).version
        except (OSError, InputError) as exc:
            raise InputError(archive, f"the restored registry serves nothing: {exc}") from None
        if serving != manifest.serving:
            raise InputError(
                archive, f"the restored registry serves {serving}, the backup {manifest.serving}"
            )
    return RestoreResult(root, manifest, check, messages, to_set)


# ----------------------------------------------------------------------------------------- the CLI


class _RichMeter:
    def __init__(self, progress) -> None:
        self.progress, self.task = progress, None

    def start(self, what: str, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.task = self.progress.add_task(what, total=total)

    def advance(self, count: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, count)


@contextlib.contextmanager
def _progress() -> Iterator[Meter]:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    console = Console(stderr=True)  # stdout keeps only the result lines (cron mails, scripts)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        yield _RichMeter(progress)


@commands.command("backup")
def backup(
    out: Annotated[Path, typer.Option("--out", "-o", help="the backup file to write (a .tar)")],
    all_versions: Annotated[
        bool, typer.Option("--all-versions", help="every model version, not only serving + rollback")
    ] = False,
    env_file: Annotated[
        Path | None, typer.Option("--env-file", help="the deployment's .env (default: ./.env)")
    ] = None,
) -> None:
    """Back up the store, the serving model versions and the settings (no secrets), while the bot runs."""
    from deploy.settings import load_settings

    if env_file is not None and not env_file.is_file():
        raise InputError(env_file, "no such settings file")
    settings = load_settings(env_file=env_file) if env_file is not None else load_settings()
    base = env_file.parent if env_file is not None else Path()
    with _progress() as meter:
        manifest = create_backup(
            settings, out, all_versions, raw_settings=deployment_settings(env_file), base=base, meter=meter
        )
    size = sum(m.size for m in manifest.files)
    models = manifest.serving or manifest.model
    if manifest.rollback_target:
        models += f" (rollback {manifest.rollback_target})"
    if manifest.all_versions:
        models = f"{', '.join(manifest.versions)}; serving {manifest.serving}"
    typer.echo(
        f"backed up to {out}: store schema v{manifest.schema_version}"
        f"{' (encrypted)' if manifest.encrypted else ''}, models {models}, "
        f"{len(manifest.files)} files, {size / 2**20:.1f} MiB"
    )
    if manifest.dataset or manifest.examples_messages:
        held = [p for p in (manifest.dataset, manifest.examples_messages) if p]
        typer.echo(f"with the retrain inputs: {', '.join(held)}")
    for name in manifest.not_included:
        typer.echo(f"{name} names nothing there: not in the backup (the restored settings keep its path)")
    kept = sorted({*manifest.secrets_removed, TOKEN_SETTING})
    typer.echo(f"not in the backup, keep them yourself: {', '.join(kept)}")


@commands.command("restore")
def restore(
    archive: Annotated[Path, typer.Argument(help="a file written by `twin backup`")],
    to: Annotated[Path, typer.Option("--to", help="a new or empty directory to restore into")],
) -> None:
    """Restore a backup into a new directory (checksums verified); then `cd DIR && twin serve`."""
    with _progress() as meter:
        result = restore_backup(archive, to, key=os.environ.get(KEY_SETTING, ""), meter=meter)
    manifest = result.manifest
    typer.echo(f"restored {archive} into {result.directory}")
    typer.echo(f"store {manifest.store}: {result.store_check}")
    if manifest.serving:
        typer.echo(f"serving {manifest.serving} (versions: {', '.join(manifest.versions)})")
    typer.echo(
        f"before `cd {result.directory} && twin serve`, set in {result.directory / RESTORED_SETTINGS}: "
        f"{', '.join(result.to_set)} (not in the backup; {TOKEN_SETTING} empty generates a new one "
        "for the QQ side)"
    )
