"""The model registry's on-disk layout: the one module that writes and reads it.

    models/
      current                 text file: the serving version's name (switched atomically)
      retrain-status.json     last/ongoing retrain cycle, read by `/twin status`
      retrain.lock            held (flock) while a retrain cycle runs
      history.json            promotions and rollbacks, oldest first (rollback walks it back)
      .history.lock           held (flock) for the moment `current` and the history change
      <version>/
        manifest.json         base, parent, data window, dataset hash, eval numbers, ggufs, created
        model-<QUANT>.gguf    quantised model(s)
        adapter/              the LoRA adapter (PEFT layout), for incremental retraining

The bot imports only this module of the registry (stdlib only): it resolves what to
serve, notices when `current` changes, and switches it for `/twin model`. Every switch
of `current` goes through `switch_current` / `rollback_current` (name check, GGUF check,
history lock, history entry); `deploy/registry.py` builds register, list and prune on top.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.files import PRIVATE_FILE_MODE, write_text_atomic  # stdlib-only, like this module

CURRENT_FILE = "current"
STATUS_FILE = "retrain-status.json"
LOCK_FILE = "retrain.lock"
HISTORY_FILE = "history.json"
HISTORY_LOCK_FILE = ".history.lock"
MANIFEST_FILE = "manifest.json"
ADAPTER_DIR = "adapter"
QUANT_PREFERENCE = ("Q4_K_M", "Q8_0", "Q5_K_M", "Q6_K", "F16", "BF16", "F32")

# A version is a plain directory name: no separators, no leading dot, nothing that path
# arithmetic could turn into a way out of the registry.
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch
NUMBERED_VERSION = re.compile(r"^v(\d+)$")
_RESERVED_NAMES = frozenset({CURRENT_FILE, STATUS_FILE, LOCK_FILE, HISTORY_FILE, MANIFEST_FILE})


class RegistryError(Exception):
    """A refused registry operation, one line `path: cause`; nothing was changed."""

    def __init__(self, path: str | Path, cause: str) -> None:
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class InvalidVersion(RegistryError, ValueError):
    """Not something to serve: a bad name, a way out of the registry, a broken manifest or GGUF."""


class VersionNotFound(RegistryError, FileNotFoundError):
    """No such version (or no registry) on disk."""


class CorruptHistory(RegistryError, ValueError):
    """`history.json` cannot be read as a list of switches."""


class NothingToRollBack(RegistryError, ValueError):
    """The history holds no earlier version that still exists."""


class CurrentMoved(RegistryError, ValueError):
    """`current` no longer names the version the caller expected (someone else switched)."""


@dataclass(slots=True)
class ResolvedModel:
    """What the bot should load: a GGUF file and, when it came from a registry, its version."""

    gguf: Path
    version: str
    manifest: dict = field(default_factory=dict)


@dataclass(slots=True)
class HistoryEntry:
    """One switch of `current`: `promote` (also `/twin model` and a retrain) or `rollback`."""

    action: str
    version: str
    previous: str | None
    at: str
    reason: str = ""
    by: str = ""  # "cli", "chat:<uin>", "retrain"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def gguf_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def read_manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def current_version(registry: Path) -> str | None:
    """The serving version named by `registry/current`, or None when nothing is promoted."""
    try:
        return (Path(registry) / CURRENT_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- versions (reading side)


def version_sort_key(name: str) -> tuple[int, str]:
    """`v2` before `v10`; other names after numbered ones, alphabetically."""
    match = NUMBERED_VERSION.match(name)
    return (int(match.group(1)), "") if match else (1 << 62, name)


def version_names(registry: str | Path) -> list[str]:
    """The registry's versions, oldest first (`v2` before `v10`): the one order everywhere."""
    registry = Path(registry)
    if not registry.is_dir():
        return []
    # Dot-names are in-progress temp dirs (atomic_dir) or versions being deleted, never versions.
    return sorted(
        (p.name for p in registry.iterdir() if is_version_name(p.name) and p.is_dir()), key=version_sort_key
    )


def is_version_name(name: object) -> bool:
    """A name a version may have: one plain path component, no leading dot, not a registry file."""
    return (
        isinstance(name, str)
        and VERSION_NAME.fullmatch(name) is not None
        and ".." not in name
        and name not in _RESERVED_NAMES
    )


def version_dir(registry: str | Path, name: str) -> Path:
    """The directory of version `name`, directly inside the registry; anything else is refused."""
    registry = Path(registry)
    if name in _RESERVED_NAMES:
        raise InvalidVersion(registry / name, "is one of the registry's own files, not a version")
    if not is_version_name(name):
        raise InvalidVersion(
            registry,
            f"{name!r} is not a version name (letters, digits, '.', '_', '-'; no path, no leading dot)",
        )
    path = registry / name
    if not path.is_dir():
        have = ", ".join(version_names(registry)) or "none"
        raise VersionNotFound(path, f"no such model version (have: {have})")
    if path.is_symlink() and path.resolve().parent != registry.resolve():
        raise InvalidVersion(path, f"is a link to {path.resolve()}, outside the registry; refusing it")
    return path


def check_version(registry: str | Path, name: str, quant: str | None = None) -> ResolvedModel:
    """What version `name` would serve, checked: a valid name, a readable manifest, a sound GGUF."""
    path = version_dir(registry, name)
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        raise InvalidVersion(path / MANIFEST_FILE, f"corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise InvalidVersion(path / MANIFEST_FILE, "corrupt manifest, expected a JSON object")
    try:
        gguf = pick_gguf(path, manifest, quant)
    except FileNotFoundError:
        raise InvalidVersion(path, "no .gguf model file in this version, refusing to serve it") from None
    verify_gguf(gguf)
    return ResolvedModel(gguf=gguf, version=name, manifest=manifest)


# ---------------------------------------------------------------- GGUF header check

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what llama.cpp loads (v1 had 32-bit counts and is refused there)
_GGUF_DEFAULT_ALIGNMENT = 32
# Metadata value types: fixed sizes; 8 = string, 9 = array.
_GGUF_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
_U64 = struct.Struct("<Q")
# ggml tensor types: (elements per block, bytes per block), to check the file holds the data.
_GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2),
}  # fmt: skip


@dataclass(slots=True)
class GgufInfo:
    version: int
    tensors: int
    metadata: int
    size: int


class _Truncated(Exception):
    pass


class _Reader:
    """Little-endian reads from a mapped file that fail cleanly past its end."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip(self, count: int) -> None:
        if count < 0 or self.pos + count > len(self.data):
            raise _Truncated
        self.pos += count

    def string(self) -> bytes:
        length = self.take("<Q")
        start = self.pos
        self.skip(length)
        return bytes(self.data[start : self.pos])

    def value(self, kind: int, depth: int = 0) -> int | None:
        """Skip one metadata value; returns it when it is a uint32 (general.alignment)."""
        if kind == _GGUF_UINT32:
            return self.take("<I")
        if kind in _GGUF_SCALAR_SIZE:
            self.skip(_GGUF_SCALAR_SIZE[kind])
        elif kind == _GGUF_STRING:
            self.skip(self.take("<Q"))
        elif kind == _GGUF_ARRAY and depth < 4:
            item, count = self.take("<I"), self.take("<Q")
            if item in _GGUF_SCALAR_SIZE:
                self.skip(count * _GGUF_SCALAR_SIZE[item])
            elif item == _GGUF_STRING:  # a tokenizer's vocabulary: 10^5 strings, kept fast
                data, pos, end, unpack = self.data, self.pos, len(self.data), _U64.unpack_from
                for _ in range(count):
                    if pos + 8 > end:
                        raise _Truncated
                    pos += 8 + unpack(data, pos)[0]
                if pos > end:
                    raise _Truncated
                self.pos = pos
            else:
                for _ in range(count):
                    self.value(item, depth + 1)
        else:
            raise ValueError(f"unknown metadata value type {kind}")
        return None


def verify_gguf(path: str | Path) -> GgufInfo:
    """Check a GGUF file from its header without loading it: magic, version, tensors, and that the
    file is long enough for the header and every tensor it lists (a truncated copy is refused)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise InvalidVersion(path, f"truncated: {size} bytes, shorter than a GGUF header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse_gguf(path, data, size)
    except OSError as exc:
        raise InvalidVersion(path, f"cannot read the model file ({exc.strerror or exc})") from None


def _parse_gguf(path: Path, data: mmap.mmap, size: int) -> GgufInfo:
    read = _Reader(data)
    if bytes(data[:4]) != GGUF_MAGIC:
        raise InvalidVersion(path, f"not a GGUF model file (starts with {bytes(data[:4])!r})")
    read.skip(4)
    version = read.take("<I")
    if version not in GGUF_VERSIONS:
        raise InvalidVersion(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    tensors, metadata = read.take("<Q"), read.take("<Q")
    if tensors == 0:
        raise InvalidVersion(path, "the GGUF file holds no tensors")
    try:
        alignment = _GGUF_DEFAULT_ALIGNMENT
        for _ in range(metadata):
            key, kind = read.string(), read.take("<I")
            found = read.value(kind)
            if key == b"general.alignment" and found:
                alignment = found
        extents = []
        for _ in range(tensors):
            read.string()
            dims = read.take("<I")
            if not 1 <= dims <= 4:
                raise ValueError(f"a tensor with {dims} dimensions")
            elements = 1
            for _ in range(dims):
                elements *= read.take("<Q")
            kind, offset = read.take("<I"), read.take("<Q")
            per_block, block_bytes = _GGML_BLOCKS.get(kind, (1, 0))  # unknown type: check its start only
            extents.append(offset + -(-elements // per_block) * block_bytes)
    except _Truncated:
        raise InvalidVersion(
            path, f"truncated: the GGUF header runs past the end of the file ({size} bytes)"
        ) from None
    except ValueError as exc:
        raise InvalidVersion(path, f"corrupt GGUF header ({exc})") from None
    data_start = -(-read.pos // alignment) * alignment
    needed = data_start + max(extents)
    if needed > size:
        raise InvalidVersion(path, f"truncated: {size} bytes, its tensors need {needed}")
    return GgufInfo(version=version, tensors=tensors, metadata=metadata, size=size)


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


def read_history(registry: str | Path) -> list[HistoryEntry]:
    """The switches of `current`, oldest first; [] when there are none."""
    path = Path(registry) / HISTORY_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptHistory(path, f"corrupt promotion history, not JSON ({exc})") from None
    known = set(HistoryEntry.__dataclass_fields__)
    try:
        return [HistoryEntry(**{k: v for k, v in entry.items() if k in known}) for entry in raw]
    except (TypeError, AttributeError) as exc:
        raise CorruptHistory(path, f"corrupt promotion history ({exc})") from None


def _write_history(registry: Path, entries: list[HistoryEntry]) -> None:
    text = json.dumps([asdict(e) for e in entries], ensure_ascii=False, indent=1)
    write_text_atomic(registry / HISTORY_FILE, text)


def promotion_stack(entries: list[HistoryEntry]) -> list[str]:
    """Replay the history: promotions push, rollbacks pop; the top is what should be serving."""
    stack: list[str] = []
    for entry in entries:
        if entry.action == "promote":
            # A `current` written before switches were recorded still counts as served.
            if entry.previous and (not stack or stack[-1] != entry.previous):
                stack.append(entry.previous)
            stack.append(entry.version)
        elif entry.action == "rollback":
            while stack and stack[-1] != entry.version:
                stack.pop()
            if not stack:
                stack.append(entry.version)
    return stack


def _exists(registry: Path, name: str) -> bool:
    return is_version_name(name) and (registry / name).is_dir()


def rollback_targets(registry: str | Path) -> list[str]:
    """Where repeated rollbacks lead, next first: the promotion stack below the serving version."""
    registry = Path(registry)
    current = current_version(registry)
    stack = promotion_stack(read_history(registry))
    while stack and stack[-1] == current:
        stack.pop()
    targets: list[str] = []
    for name in reversed(stack):
        if name != current and name not in targets and _exists(registry, name):
            targets.append(name)
    return targets


def previous_version(registry: str | Path) -> str | None:
    """The version a rollback would return to: the one promoted before the serving one."""
    targets = rollback_targets(registry)
    return targets[0] if targets else None


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


def cycle_running(registry: str | Path) -> bool:
    """True while some process holds the registry's retrain lock."""
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


# ---------------------------------------------------------------- resolving what to serve


def pick_gguf(model_dir: Path, manifest: dict, quant: str | None = None) -> Path:
    """The GGUF inside a model directory: the requested quant, else the preferred one present."""
    files: dict[str, str] = dict(manifest.get("gguf") or {})
    if quant:
        order = [quant]
    else:
        default = manifest.get("default_quant")
        order = ([default] if default else []) + list(QUANT_PREFERENCE)
    for q in order:
        named = files.get(q)
        # The manifest names a file in this directory, never a path elsewhere.
        if isinstance(named, str) and _plain_file_name(named) and (model_dir / named).is_file():
            return model_dir / named
        if (model_dir / gguf_name(q)).is_file():
            return model_dir / gguf_name(q)
    found = sorted(model_dir.glob("*.gguf"))
    if found:
        return found[0]
    raise FileNotFoundError(f"{model_dir}: no .gguf model file in this directory")


def _plain_file_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def resolve_model(path: str | Path, quant: str | None = None) -> ResolvedModel:
    """A `.gguf` file, a model directory (with manifest.json) or a registry (with `current`)."""
    path = Path(path)
    if path.is_file():
        return ResolvedModel(gguf=path, version=path.stem)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model file or directory")
    if (path / CURRENT_FILE).is_file():
        version = current_version(path)
        if version is None:
            raise FileNotFoundError(f"{path / CURRENT_FILE}: names no version")
        try:
            model_dir = version_dir(path, version)
        except InvalidVersion as exc:  # a hand-edited `current`: as unusable as a missing version
            raise VersionNotFound(path / CURRENT_FILE, f"names no usable version ({exc.cause})") from None
        manifest = read_manifest(model_dir)
        return ResolvedModel(gguf=pick_gguf(model_dir, manifest, quant), version=version, manifest=manifest)
    manifest = read_manifest(path)
    version = str(manifest.get("version") or path.name)
    return ResolvedModel(gguf=pick_gguf(path, manifest, quant), version=version, manifest=manifest)


# Retrain status (`retrain-status.json`): written by deploy.retrain, read by `/twin status`.
# Keys: state (idle|running|promoted|rejected|skipped|registered|failed), stage (collect|build|train|
# evaluate|export|promote), progress (0..1 within the stage), started, finished, updated (ISO
# UTC), pid, version (candidate), serving (the version serving), reason (one line), eval.
STATUS_STATES = ("idle", "running", "promoted", "rejected", "skipped", "registered", "failed")


def read_status(registry: Path) -> dict:
    """The last or ongoing retrain cycle's status; {} when none was recorded or it is unreadable."""
    try:
        data = json.loads((Path(registry) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_status(registry: Path, status: dict) -> None:
    """Replace the status file atomically and durably (readers never see half a file)."""
    write_text_atomic(Path(registry) / STATUS_FILE, json.dumps(status, ensure_ascii=False, indent=1))
