"""Every change of the model registry: register, switch `current`, roll back, prune, the retrain
lock and status. The layout and everything that reads it are in `pipeline.registry`.

`switch_current` / `rollback_current` are the only writers of `current` and the history: every
promotion (`twin models promote`, `/twin model`, a retrain), rollback and prune holds the same
history lock. Every change is atomic: a version directory appears under its final name only when
complete, and prune renames a version away under the lock before deleting it. Stdlib only: the
bot imports `switch_current` for `/twin model`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from pipeline.errors import InputError, TwinError
from pipeline.files import PRIVATE_FILE_MODE, atomic_dir, private_dir, write_text_atomic
from pipeline.registry import (
    CURRENT_FILE,
    CYCLES_FILE,
    HISTORY_FILE,
    HISTORY_LOCK_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    MAX_CYCLES,
    NUMBERED_VERSION,
    STATUS_FILE,
    HistoryEntry,
    ModelVersion,
    RegistryError,
    VersionNotFound,
    check_version,
    current_version,
    cycle_entry,
    cycle_running,
    get_version,
    ggufs_in,
    is_version_name,
    now_iso,
    previous_version,
    read_history,
    read_manifest,
    rollback_targets,
    version_names,
)


class NothingToRollBack(RegistryError, ValueError):
    """The history holds no earlier version that still exists."""


class CurrentMoved(RegistryError, ValueError):
    """`current` no longer names the version the caller expected (someone else switched)."""


class RetrainBusy(TwinError):
    """Another retrain cycle holds the registry's lock."""


# ---------------------------------------------------------------- switching `current` (guarded)


@contextlib.contextmanager
def history_lock(registry: str | Path) -> Iterator[None]:
    """Hold the registry's short lock: `current` and the history change together, one writer at a time."""
    registry = Path(registry)
    if not registry.is_dir():
        raise VersionNotFound(registry, "no such model registry directory")
    fd = os.open(registry / HISTORY_LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_history(registry: Path, entries: list[HistoryEntry]) -> None:
    text = json.dumps([asdict(e) for e in entries], ensure_ascii=False, indent=1)
    write_text_atomic(registry / HISTORY_FILE, text)


ANY_CURRENT = object()  # `switch_current(expect_current=...)` default: switch whatever serves now


def switch_current(
    registry: str | Path,
    version: str,
    *,
    by: str,
    reason: str = "",
    expect_current: str | object | None = ANY_CURRENT,
    quant: str | None = None,
) -> str:
    """Serve `version`: the one way to promote (`twin models promote`, `/twin model`, a retrain).

    Checks the name and the GGUF, then under the history lock switches `current` (durably)
    and records a `promote` entry by `by` ("cli", "chat:<uin>", "retrain"). With
    `expect_current`, refuses (CurrentMoved) unless `current` still names that version.
    Returns the version now serving; on any RegistryError nothing has changed.
    """
    registry = Path(registry)
    with history_lock(registry):
        before = current_version(registry)
        if expect_current is not ANY_CURRENT and before != expect_current:
            raise CurrentMoved(
                registry / CURRENT_FILE, f"names {before}, not {expect_current}: someone switched meanwhile"
            )
        return _switch_locked(registry, version, "promote", by=by, reason=reason, quant=quant)


def rollback_current(registry: str | Path, *, by: str, reason: str = "") -> str:
    """Serve the previously promoted version again (repeated rollbacks walk further back)."""
    registry = Path(registry)
    with history_lock(registry):
        targets = rollback_targets(registry)
        if not targets:
            raise NothingToRollBack(registry / HISTORY_FILE, "no earlier promoted version to roll back to")
        return _switch_locked(registry, targets[0], "rollback", by=by, reason=reason)


def _switch_locked(
    registry: Path, version: str, action: str, *, by: str, reason: str, quant: str | None = None
) -> str:
    """The only writer of `current`; the caller holds the history lock."""
    check_version(registry, version, quant)
    entries = read_history(registry)  # before anything changes: a corrupt history refuses the switch
    before = current_version(registry)
    if before == version:
        return version
    # `current` first: a crash before the history is written leaves a rollback that returns to
    # `before`, which is what served before, instead of one that returns to a version never served.
    write_text_atomic(registry / CURRENT_FILE, version + "\n")
    entries.append(HistoryEntry(action, version, before, now_iso(), reason, by))
    _write_history(registry, entries)
    return version


def promote(
    registry: str | Path,
    name: str,
    *,
    reason: str = "",
    by: str = "cli",
    expect_current: str | object | None = ANY_CURRENT,
) -> ModelVersion:
    """Serve the registered version `name` (its manifest must read) through `switch_current`."""
    target = get_version(registry, name)
    switch_current(registry, name, by=by, reason=reason, expect_current=expect_current)
    return target


def rollback(registry: str | Path, *, reason: str = "", by: str = "cli") -> ModelVersion:
    """`rollback_current` for the CLI: the target's manifest must read before anything changes."""
    registry = Path(registry)
    expected = previous_version(registry)
    if expected is not None:
        get_version(registry, expected)
    name = rollback_current(registry, by=by, reason=reason)
    return get_version(registry, name) if name == expected else ModelVersion(name, registry / name)


# ---------------------------------------------------------------- registering and pruning versions


def next_version_name(registry: Path) -> str:
    numbers = [int(m.group(1)) for name in version_names(registry) if (m := NUMBERED_VERSION.match(name))]
    return f"v{max(numbers, default=0) + 1:04d}"


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
    exported = read_manifest(export_dir)  # an export without one is registered from its files
    ggufs = ggufs_in(export_dir)
    if not ggufs and not list(export_dir.glob("*.gguf")):
        raise InputError(export_dir, "no .gguf model file in this directory (run `twin export` first)")
    name = version or next_version_name(registry)
    if not is_version_name(name):
        raise InputError(registry, f"{name!r} is not a valid version name")
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
        os.chmod(tmp / MANIFEST_FILE, PRIVATE_FILE_MODE)
    if move:
        shutil.rmtree(export_dir, ignore_errors=True)
    return ModelVersion(name=name, path=final, manifest=manifest)


def protected_versions(registry: str | Path, keep: int) -> set[str]:
    """What prune keeps whatever its age: the serving version, the next `keep - 1` (at least one)
    rollback targets, and while a retrain cycle runs every version newer than the serving one
    (the cycle may just have registered it)."""
    registry = Path(registry)
    current = current_version(registry)
    protected = set(rollback_targets(registry)[: max(keep - 1, 1)])
    if current:
        protected.add(current)
    if cycle_running(registry):
        names = version_names(registry)
        protected.update(names[names.index(current) + 1 :] if current in names else names)
    return protected


def prune(registry: str | Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never a protected one (see protected_versions)."""
    registry = Path(registry)
    if keep < 1:
        raise ValueError("keep must be at least 1")
    # Under the history lock: no switch can pick a version while it is being removed.
    with history_lock(registry):
        names = version_names(registry)
        protected = protected_versions(registry, keep)
        removable = [n for n in names[: max(len(names) - keep, 0)] if n not in protected]
        for name in removable:
            # Rename first so that a half-deleted version never looks like a real one.
            os.replace(registry / name, registry / f".{name}.deleting")
    for name in removable:
        doomed = registry / f".{name}.deleting"
        if doomed.is_symlink():
            doomed.unlink()
        else:
            shutil.rmtree(doomed, ignore_errors=True)
    return removable


# ---------------------------------------------------------------- the retrain cycle: lock and status


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


def write_status(registry: str | Path, status: dict) -> None:
    """Replace the status file atomically and durably (readers never see half a file)."""
    write_text_atomic(Path(registry) / STATUS_FILE, json.dumps(status, ensure_ascii=False, indent=1))


def append_cycle(registry: str | Path, entry: dict) -> None:
    """Add a finished cycle to `retrain-cycles.jsonl`, keeping the newest MAX_CYCLES; the caller
    holds the retrain lock (the one writer), and the file is replaced atomically."""
    path = Path(registry) / CYCLES_FILE
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    kept = [line for line in lines if _is_cycle_line(line)]
    kept.append(json.dumps(entry, ensure_ascii=False, default=str))
    write_text_atomic(path, "\n".join(kept[-MAX_CYCLES:]) + "\n")


def _is_cycle_line(line: str) -> bool:
    try:
        return cycle_entry(json.loads(line)) is not None
    except ValueError:
        return False
