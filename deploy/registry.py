"""Model registry operations: register an exported model, promote, roll back, list, prune.

The layout itself (file names, `current`, how the bot resolves what to serve) lives in
`pipeline.registry`; this module adds the operations on top of it. Every change is
atomic: a version directory appears under its final name only when complete, `current`
is switched by rename, and the promotion history is rewritten whole under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import InputError, TwinError
from pipeline.files import atomic_dir, private_dir, write_text_atomic
from pipeline.registry import (
    CURRENT_FILE,
    HISTORY_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    current_version,
    pick_gguf,
    set_current,
)

VERSION_PATTERN = re.compile(r"^v(\d+)$")
_HISTORY_LOCK = ".history.lock"
_GGUF_PATTERN = re.compile(r"^model-(.+)\.gguf$")


class RetrainBusy(TwinError):
    """Another retrain cycle holds the registry's lock."""


@dataclass(slots=True)
class ModelVersion:
    """One registered version as listed by `twin models`."""

    name: str
    path: Path
    manifest: dict = field(default_factory=dict)

    @property
    def created(self) -> str:
        return str(self.manifest.get("created") or "")

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    @property
    def eval(self) -> dict:
        """The twin's numbers: a retrain's gate numbers, or those of `twin eval` (eval.json) on export."""
        numbers = dict(self.manifest.get("eval") or {})
        numbers.setdefault("perplexity", numbers.get("twin_perplexity"))
        numbers.setdefault("style_distance", numbers.get("twin_style_distance"))
        return numbers


@dataclass(slots=True)
class HistoryEntry:
    """One switch of `current`: a promotion or a rollback."""

    action: str  # "promote" | "rollback"
    version: str
    previous: str | None
    at: str
    reason: str = ""


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def version_sort_key(name: str) -> tuple[int, str]:
    """`v2` before `v10`; other names after numbered ones, alphabetically."""
    match = VERSION_PATTERN.match(name)
    return (int(match.group(1)), "") if match else (1 << 62, name)


def next_version_name(registry: Path) -> str:
    numbers = [int(m.group(1)) for p in _version_dirs(registry) if (m := VERSION_PATTERN.match(p.name))]
    return f"v{max(numbers, default=0) + 1:04d}"


def _version_dirs(registry: Path) -> list[Path]:
    if not registry.is_dir():
        return []
    # Dot-names are in-progress temp dirs (atomic_dir) and never versions.
    return [p for p in registry.iterdir() if p.is_dir() and not p.name.startswith(".")]


def load_manifest(model_dir: Path) -> dict:
    """A version's manifest; a missing or unreadable one is a clear InputError."""
    path = model_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no manifest.json: not a registered model version") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"corrupt manifest, not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "corrupt manifest, expected a JSON object")
    return data


def get_version(registry: str | Path, name: str) -> ModelVersion:
    registry = Path(registry)
    path = registry / name
    if name.startswith(".") or "/" in name or not path.is_dir():
        raise InputError(
            path, f"no such model version (have: {', '.join(version_names(registry)) or 'none'})"
        )
    return ModelVersion(name=name, path=path, manifest=load_manifest(path))


def version_names(registry: str | Path) -> list[str]:
    return sorted((p.name for p in _version_dirs(Path(registry))), key=version_sort_key)


def list_versions(registry: str | Path) -> list[ModelVersion]:
    """All registered versions, oldest first."""
    registry = Path(registry)
    return [get_version(registry, name) for name in version_names(registry)]


def _ggufs_in(model_dir: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for p in sorted(model_dir.glob("*.gguf")):
        match = _GGUF_PATTERN.match(p.name)
        if match:
            found[match.group(1)] = p.name
    return found


def register(
    registry: str | Path,
    export_dir: str | Path,
    *,
    parent: str | None = None,
    data_window: dict | None = None,
    dataset_hash: str | None = None,
    eval_numbers: dict | None = None,
    version: str | None = None,
    extra: dict | None = None,
    move: bool = False,
) -> ModelVersion:
    """Copy (or move) an exported model directory in as a new version with a full manifest.

    The export's own manifest (base, quantisation, sizes...) is kept; the registry adds
    version, parent, data window, dataset hash, eval numbers and created.
    """
    registry = private_dir(registry)
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise InputError(export_dir, "no such exported model directory")
    exported = load_manifest(export_dir) if (export_dir / MANIFEST_FILE).exists() else {}
    ggufs = _ggufs_in(export_dir)
    if not ggufs and not list(export_dir.glob("*.gguf")):
        raise InputError(export_dir, "no .gguf model file in this directory (run `twin export` first)")
    name = version or next_version_name(registry)
    if not name or name.startswith(".") or "/" in name or name == CURRENT_FILE:
        raise InputError(registry / name, "not a valid version name")
    final = registry / name
    if final.exists():
        raise InputError(final, "version already exists")

    manifest = dict(exported)
    manifest.update(
        {
            "version": name,
            "parent": parent,
            "data_window": data_window or manifest.get("data_window") or {},
            "dataset_hash": dataset_hash or manifest.get("dataset_hash"),
            "eval": eval_numbers if eval_numbers is not None else manifest.get("eval", {}),
            "created": now_iso(),
        }
    )
    manifest["gguf"] = {**ggufs, **dict(manifest.get("gguf") or {})}
    if extra:
        manifest.update(extra)

    with atomic_dir(final) as tmp:
        for item in export_dir.iterdir():
            if item.name == MANIFEST_FILE:
                continue
            target = tmp / item.name
            if move:
                shutil.move(str(item), target)
            elif item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
        os.chmod(tmp / MANIFEST_FILE, 0o600)
    if move:
        shutil.rmtree(export_dir, ignore_errors=True)
    return ModelVersion(name=name, path=final, manifest=manifest)


@contextlib.contextmanager
def _history_locked(registry: Path) -> Iterator[None]:
    # A short blocking lock: an operator's `promote` and a retrain's promote may race.
    with open(registry / _HISTORY_LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_history(registry: str | Path) -> list[HistoryEntry]:
    path = Path(registry) / HISTORY_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"corrupt promotion history, not JSON ({exc})") from None
    try:
        return [HistoryEntry(**entry) for entry in raw]
    except TypeError as exc:
        raise InputError(path, f"corrupt promotion history ({exc})") from None


def _write_history(registry: Path, entries: list[HistoryEntry]) -> None:
    data = [
        {"action": e.action, "version": e.version, "previous": e.previous, "at": e.at, "reason": e.reason}
        for e in entries
    ]
    write_text_atomic(registry / HISTORY_FILE, json.dumps(data, ensure_ascii=False, indent=1))


def promotion_stack(entries: list[HistoryEntry]) -> list[str]:
    """Replay the history: promotions push, rollbacks pop; the top is what should be serving."""
    stack: list[str] = []
    for entry in entries:
        if entry.action == "promote":
            stack.append(entry.version)
        elif entry.action == "rollback":
            while stack and stack[-1] != entry.version:
                stack.pop()
            if not stack:
                stack.append(entry.version)
    return stack


def previous_version(registry: str | Path) -> str | None:
    """The version a rollback would return to: the one promoted before the serving one."""
    registry = Path(registry)
    current = current_version(registry)
    for name in reversed(promotion_stack(read_history(registry))):
        if name != current and (registry / name).is_dir():
            return name
    return None


def promote(registry: str | Path, name: str, *, reason: str = "") -> ModelVersion:
    """Make `name` the serving version (atomic switch of `current`) and record it."""
    registry = Path(registry)
    target = get_version(registry, name)
    try:
        pick_gguf(target.path, target.manifest)
    except FileNotFoundError:
        raise InputError(target.path, "no .gguf model file in this version, refusing to serve it") from None
    with _history_locked(registry):
        entries = read_history(registry)
        before = current_version(registry)
        set_current(registry, name)
        if before != name:
            entries.append(HistoryEntry("promote", name, before, now_iso(), reason))
            _write_history(registry, entries)
    return target


def rollback(registry: str | Path, *, reason: str = "") -> ModelVersion:
    """Serve the previously promoted version again; repeated rollbacks walk further back."""
    registry = Path(registry)
    with _history_locked(registry):
        entries = read_history(registry)
        before = current_version(registry)
        stack = promotion_stack(entries)
        while stack and (stack[-1] == before or not (registry / stack[-1]).is_dir()):
            stack.pop()
        if not stack:
            raise InputError(registry / HISTORY_FILE, "no earlier promoted version to roll back to")
        target = get_version(registry, stack[-1])
        set_current(registry, target.name)
        entries.append(HistoryEntry("rollback", target.name, before, now_iso(), reason))
        _write_history(registry, entries)
    return target


def prune(registry: str | Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never the serving or the previous one."""
    registry = Path(registry)
    if keep < 1:
        raise ValueError("keep must be at least 1")
    names = version_names(registry)
    protected = {current_version(registry), previous_version(registry)}
    removable = [n for n in names[: max(len(names) - keep, 0)] if n not in protected]
    for name in removable:
        # Rename first so that a half-deleted version never looks like a real one.
        doomed = registry / f".{name}.deleting"
        os.replace(registry / name, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removable


@contextlib.contextmanager
def retrain_lock(registry: str | Path) -> Iterator[Path]:
    """Hold the registry's retrain lock for one cycle; a second holder gets RetrainBusy at once."""
    registry = private_dir(registry)
    path = registry / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole cycle
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            who = f" (pid {holder})" if holder else ""
            raise RetrainBusy(
                f"{path}: a retrain cycle is already running{who}; try again when it ends"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def cycle_running(registry: str | Path) -> bool:
    """True while some process holds the retrain lock."""
    path = Path(registry) / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False
