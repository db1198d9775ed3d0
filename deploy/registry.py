"""Model registry operations: register an exported model, promote, roll back, list, prune.

The layout itself (file names, `current`, the history, how the bot resolves what to serve)
and the one guarded switch of `current` live in `pipeline.registry`; this module adds the
operations on top of it and turns its refusals into one-line `InputError`s. Every change is
atomic: a version directory appears under its final name only when complete, `current` and
the history change together under the registry's history lock, and prune renames a version
away under that lock before deleting it.
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
from pathlib import Path

from pipeline import registry as layout
from pipeline.errors import InputError, TwinError
from pipeline.files import PRIVATE_FILE_MODE, atomic_dir, private_dir
from pipeline.registry import (  # re-exported: the layout's reading side, one definition each
    ANY_CURRENT,
    LOCK_FILE,
    MANIFEST_FILE,
    NUMBERED_VERSION,
    CurrentMoved,
    HistoryEntry,
    RegistryError,
    current_version,
    cycle_running,
    history_lock,
    is_version_name,
    now_iso,
    promotion_stack,
    rollback_current,
    switch_current,
    version_names,
    version_sort_key,
)

__all__ = [
    "CurrentMoved",
    "HistoryEntry",
    "ModelVersion",
    "RetrainBusy",
    "cycle_running",
    "get_version",
    "list_versions",
    "now_iso",
    "previous_version",
    "promote",
    "promotion_stack",
    "protected_versions",
    "prune",
    "read_history",
    "register",
    "retrain_lock",
    "rollback",
    "version_names",
    "version_sort_key",
]

_GGUF_PATTERN = re.compile(r"^model-(.+)\.gguf$")


class RetrainBusy(TwinError):
    """Another retrain cycle holds the registry's lock."""


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """The layout's refusals as the CLI's one-line InputError (`path: cause`, exit 2)."""
    try:
        yield
    except CurrentMoved:
        raise  # not a user error: the retrain cycle handles it
    except RegistryError as exc:
        raise InputError(exc.path, exc.cause) from None


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


def next_version_name(registry: Path) -> str:
    numbers = [int(m.group(1)) for name in version_names(registry) if (m := NUMBERED_VERSION.match(name))]
    return f"v{max(numbers, default=0) + 1:04d}"


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
    with _one_line_errors():
        path = layout.version_dir(registry, name)
    return ModelVersion(name=name, path=path, manifest=load_manifest(path))


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


def read_history(registry: str | Path) -> list[HistoryEntry]:
    """The switches of `current`, oldest first."""
    with _one_line_errors():
        return layout.read_history(registry)


def previous_version(registry: str | Path) -> str | None:
    """The version a rollback would return to: the one promoted before the serving one."""
    with _one_line_errors():
        return layout.previous_version(registry)


def promote(
    registry: str | Path,
    name: str,
    *,
    reason: str = "",
    by: str = "cli",
    expect_current: str | object | None = ANY_CURRENT,
) -> ModelVersion:
    """Make `name` the serving version through the registry's guarded switch and record it.

    With `expect_current`, raises CurrentMoved (nothing changed) if someone switched meanwhile.
    """
    target = get_version(registry, name)  # a registered version: its manifest must read
    with _one_line_errors():
        switch_current(registry, name, by=by, reason=reason, expect_current=expect_current)
    return target


def rollback(registry: str | Path, *, reason: str = "", by: str = "cli") -> ModelVersion:
    """Serve the previously promoted version again; repeated rollbacks walk further back."""
    registry = Path(registry)
    expected = previous_version(registry)
    if expected is not None:
        get_version(registry, expected)  # a corrupt manifest refuses before anything changes
    with _one_line_errors():
        name = rollback_current(registry, by=by, reason=reason)
    return get_version(registry, name) if name == expected else ModelVersion(name, registry / name)


def protected_versions(registry: str | Path, keep: int) -> set[str]:
    """What prune keeps whatever its age: the serving version, the next `keep - 1` (at least one)
    rollback targets, and while a retrain cycle runs every version newer than the serving one
    (the cycle may just have registered it)."""
    registry = Path(registry)
    current = current_version(registry)
    protected = set(layout.rollback_targets(registry)[: max(keep - 1, 1)])
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
    with _one_line_errors(), history_lock(registry):
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
