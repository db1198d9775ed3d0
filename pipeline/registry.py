"""The model registry's on-disk layout: the one module that knows it and reads it.

    models/
      current                 text file: the serving version's name (switched atomically)
      retrain-status.json     last/ongoing retrain cycle, read by `/twin status` and `twin retrain`
      retrain-cycles.jsonl    every finished cycle, one JSON line each, oldest first (newest 200 kept)
      retrain.lock            held (flock) while a retrain cycle runs
      history.json            promotions and rollbacks, oldest first (rollback walks it back)
      .history.lock           held (flock) for the moment `current` and the history change
      probes.jsonl            held-out prompts every version answers (`twin models samples`)
      <version>/
        manifest.json         base, parent, data window, dataset hash, eval numbers, ggufs, created
        samples.json          this version's greedy replies to probes.jsonl (with that file's hash)
        model-<QUANT>.gguf    quantised model(s)
        adapter/              the LoRA adapter (PEFT layout), for incremental retraining and
                              for vLLM, which serves it as `twin-<version>-<fingerprint>`
                              (`lora_modules`)

Reading only (stdlib only, the bot imports it): what to serve, the versions in their one
order, manifests, the history, the retrain lock and status. Every change of the layout
(register, switch, rollback, prune, the retrain lock and status) is in `pipeline.registry_ops`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import InputError  # stdlib-only, like this module

CURRENT_FILE = "current"
STATUS_FILE = "retrain-status.json"
CYCLES_FILE = "retrain-cycles.jsonl"
LOCK_FILE = "retrain.lock"
HISTORY_FILE = "history.json"
HISTORY_LOCK_FILE = ".history.lock"
MANIFEST_FILE = "manifest.json"
PROBES_FILE = "probes.jsonl"
SAMPLES_FILE = "samples.json"
ADAPTER_DIR = "adapter"
QUANT_PREFERENCE = ("Q4_K_M", "Q8_0", "Q5_K_M", "Q6_K", "F16", "BF16", "F32")

# A version is a plain directory name: no separators, no leading dot, nothing that path
# arithmetic could turn into a way out of the registry.
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch
NUMBERED_VERSION = re.compile(r"^v(\d+)$")
_RESERVED_NAMES = frozenset(
    {CURRENT_FILE, STATUS_FILE, CYCLES_FILE, LOCK_FILE, HISTORY_FILE, MANIFEST_FILE, PROBES_FILE}
)
_GGUF_PREFIX, _GGUF_SUFFIX = "model-", ".gguf"


class RegistryError(InputError):
    """A refused registry operation, one line `path: cause` (the CLI's exit 2); nothing was changed."""


class InvalidVersion(RegistryError, ValueError):
    """Not something to serve: a bad name, a way out of the registry, a broken manifest or GGUF."""


class VersionNotFound(RegistryError, FileNotFoundError):
    """No such version (or no registry) on disk."""


class CorruptHistory(RegistryError, ValueError):
    """`history.json` cannot be read as a list of switches."""


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
    """The file name of a version's model in quantisation `quant`: `model-<QUANT>.gguf`."""
    return f"{_GGUF_PREFIX}{quant}{_GGUF_SUFFIX}"


def quant_of(file_name: str) -> str | None:
    """The quantisation a `model-<QUANT>.gguf` name carries; None for any other name."""
    if file_name.startswith(_GGUF_PREFIX) and file_name.endswith(_GGUF_SUFFIX):
        return file_name[len(_GGUF_PREFIX) : -len(_GGUF_SUFFIX)] or None
    return None


def ggufs_in(model_dir: Path) -> dict[str, str]:
    """The `model-<QUANT>.gguf` files of a directory: quantisation → file name."""
    return {q: p.name for p in sorted(Path(model_dir).glob("*.gguf")) if (q := quant_of(p.name))}


def read_manifest(model_dir: Path, *, required: bool = False) -> dict:
    """A version's manifest; {} when there is none, unless `required` (a registered version).

    Unreadable JSON or anything but an object is InvalidVersion either way."""
    path = Path(model_dir) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise VersionNotFound(path, "no manifest.json: not a registered model version") from None
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidVersion(path, f"corrupt manifest, not JSON ({exc})") from None
    except OSError as exc:
        raise InvalidVersion(path, f"cannot read the manifest ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise InvalidVersion(path, "corrupt manifest, expected a JSON object")
    return data


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
    manifest = read_manifest(path)
    try:
        gguf = pick_gguf(path, manifest, quant)
    except FileNotFoundError:
        raise InvalidVersion(path, "no .gguf model file in this version, refusing to serve it") from None
    verify_gguf(gguf)
    return ResolvedModel(gguf=gguf, version=name, manifest=manifest)


@dataclass(slots=True)
class ModelVersion:
    """One registered version (its manifest read strictly), as `twin models` lists it."""

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


def get_version(registry: str | Path, name: str) -> ModelVersion:
    """A registered version: a valid name, a directory in the registry, a readable manifest."""
    path = version_dir(registry, name)
    return ModelVersion(name=name, path=path, manifest=read_manifest(path, required=True))


def next_window_start(registry: str | Path, serving: str | None = None) -> int:
    """The first message time the next retrain cycle reads: just after the data window of the
    serving version (or `serving`); 0, everything, when nothing serves or it names no window."""
    name = serving if serving is not None else current_version(registry)
    if name is None:
        return 0
    version = get_version(registry, name)
    window = version.manifest.get("data_window") or {}
    until = window.get("until") if isinstance(window, dict) else None
    if not until:
        return 0
    try:
        return int(until) + 1
    except (TypeError, ValueError):
        raise InvalidVersion(
            version.path / MANIFEST_FILE, f"data_window.until is not a time: {until!r}"
        ) from None


def list_versions(registry: str | Path) -> list[ModelVersion]:
    """All registered versions, oldest first."""
    return [get_version(registry, name) for name in version_names(registry)]


# ---------------------------------------------------------------- probes and sample replies


@dataclass(frozen=True, slots=True)
class Probe:
    """One held-out prompt: the conversation up to the owner's reply, and that real reply."""

    id: str
    messages: list[dict[str, str]]  # system/user/assistant…, without the final assistant turn
    owner_reply: str


def probes_hash(registry: str | Path) -> str | None:
    """The hash of `probes.jsonl` (samples made for other probes are stale); None without it."""
    try:
        return hashlib.sha256((Path(registry) / PROBES_FILE).read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return None


def read_probes(registry: str | Path) -> list[Probe]:
    """The registry's probes, in file order; [] without the file; InvalidVersion when corrupt."""
    path = Path(registry) / PROBES_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidVersion(path, f"cannot read the probes ({exc})") from None
    probes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
            probes.append(Probe(str(row["id"]), messages, str(row["owner_reply"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidVersion(path, f"line {number} is not a probe ({exc})") from None
    return probes


def read_samples(model_dir: str | Path, probes: str | None) -> dict[str, str]:
    """A version's replies by probe id, only when made for the probes hashed `probes`; else {}."""
    try:
        data = json.loads((Path(model_dir) / SAMPLES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or probes is None or data.get("probes") != probes:
        return {}
    replies = data.get("replies")
    if not isinstance(replies, list):
        return {}
    return {
        str(r["id"]): str(r["text"]) for r in replies if isinstance(r, dict) and "id" in r and "text" in r
    }


# ---------------------------------------------------------------- history (reading side)


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


# ---------------------------------------------------------------- LoRA adapters for vLLM

LORA_PREFIX = "twin-"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# vLLM's LoRAConfig accepts only these --max-lora-rank values (vllm/config/lora.py, 0.8+).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(slots=True)
class LoraModule:
    """One version's adapter as vLLM loads it: `--lora-modules <name>=<path>`."""

    name: str  # twin-<version>-<fingerprint>
    version: str
    path: Path  # the adapter directory, absolute, inside the registry
    rank: int
    base: str  # the base model the adapter applies to ("" when nothing names one)


def adapter_fingerprint(adapter: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of an adapter's weights (cached per file state).

    Part of the LoRA name, so that two registries (two QQ accounts) sharing one vLLM never
    ask for each other's adapter under the same `v0001`; equal weights give the equal name."""
    weights = Path(adapter) / ADAPTER_WEIGHTS_FILE
    try:
        stat = weights.stat()
    except OSError as exc:
        raise InvalidVersion(weights, f"unreadable adapter weights ({exc.strerror or exc})") from None
    return _fingerprint(str(weights.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=64)
def _fingerprint(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def lora_module_name(version: str, adapter: str | Path) -> str:
    """The model name a version is served under by vLLM: `twin-<version>-<fingerprint>`, the
    fingerprint that of the adapter's weights (`adapter_fingerprint`)."""
    if not is_version_name(version):
        raise InvalidVersion(Path(str(version)), "is not a version name, no LoRA module name for it")
    return f"{LORA_PREFIX}{version}-{adapter_fingerprint(adapter)}"


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def lora_module(registry: str | Path, version: str) -> LoraModule:
    """Version `version`'s adapter, checked: config and weights present, nothing outside the registry."""
    root = Path(registry).resolve()
    model_dir = version_dir(registry, version)
    adapter = model_dir / ADAPTER_DIR
    config_path, weights = adapter / ADAPTER_CONFIG_FILE, adapter / ADAPTER_WEIGHTS_FILE
    # A link out of the registry would let vLLM load (or the bot publish) files nobody registered.
    for path in (model_dir, adapter, config_path, weights):
        if path.exists() and not _inside(path, root):
            raise InvalidVersion(path, f"is a link to {path.resolve()}, outside the registry; refusing it")
    if not adapter.is_dir():
        raise InvalidVersion(adapter, "no LoRA adapter directory in this version")
    if not weights.is_file():
        raise InvalidVersion(weights, "missing: the adapter has no weights vLLM can load")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidVersion(config_path, "missing: not a PEFT LoRA adapter") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidVersion(config_path, f"unreadable adapter config ({exc})") from None
    rank = config.get("r") if isinstance(config, dict) else None
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidVersion(config_path, f"no positive integer rank `r` (found {rank!r})")
    manifest = read_manifest(model_dir)
    base = manifest.get("base") or config.get("base_model_name_or_path") or ""
    name = lora_module_name(version, adapter)
    return LoraModule(name, version, adapter.resolve(), rank, str(base))


def lora_modules(registry: str | Path, versions: list[str] | None = None) -> list[LoraModule]:
    """The adapters to publish: `versions`, by default the serving one and its rollback target."""
    if versions is None:
        current = current_version(registry)
        previous = previous_version(registry)
        versions = [v for v in (current, previous) if v]
        if not versions:
            raise VersionNotFound(
                Path(registry) / CURRENT_FILE, "names no serving version; nothing to publish"
            )
    return [lora_module(registry, v) for v in versions]


def vllm_max_lora_rank(modules: list[LoraModule]) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that covers every adapter's rank."""
    needed = max((m.rank for m in modules), default=VLLM_LORA_RANKS[0])
    for allowed in VLLM_LORA_RANKS:
        if allowed >= needed:
            return allowed
    worst = max(modules, key=lambda m: m.rank)
    raise InvalidVersion(
        worst.path, f"rank {worst.rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}"
    )


def vllm_lora_args(
    registry: str | Path, modules: list[LoraModule], path_prefix: str | None = None
) -> list[str]:
    """`--enable-lora --max-lora-rank R --lora-modules twin-vNNNN-<fp>=PATH …` for `vllm serve`.

    `path_prefix` replaces the registry directory in each path (where vLLM's container mounts it).
    Adapters trained on different bases cannot share one server: refused."""
    bases = sorted({m.base for m in modules if m.base})
    if len(bases) > 1:
        named = ", ".join(f"{m.version}: {m.base}" for m in modules)
        raise InvalidVersion(
            Path(registry), f"adapters of different base models cannot share one vLLM ({named})"
        )
    root = Path(registry).resolve()
    if path_prefix is not None and not path_prefix.startswith("/"):
        raise InputError(path_prefix, "--path-prefix must be an absolute path (inside vLLM's container)")
    specs = []
    for m in modules:
        path = (
            str(m.path)
            if path_prefix is None
            else f"{path_prefix.rstrip('/')}/{m.path.relative_to(root).as_posix()}"
        )
        if any(c.isspace() for c in path):  # `$(twin models vllm-args)` would split it in two
            raise InputError(path, "an adapter path with whitespace cannot be passed on vLLM's command line")
        specs.append(f"{m.name}={path}")
    return ["--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank(modules)), "--lora-modules", *specs]


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


# ---------------------------------------------------------------- the retrain cycle: lock and status


def cycle_running(registry: str | Path) -> bool:
    """True while some process holds the registry's retrain lock: the one probe of a running cycle."""
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


# `retrain-status.json`, written by deploy.retrain through registry_ops.write_status. Keys: state,
# stage (collect|build|train|evaluate|export|promote), progress (0..1 within the stage), started,
# finished, updated (ISO UTC), pid, serving, version, new_samples, reason (one line), eval, last.
STATUS_STATES = ("running", "promoted", "rejected", "skipped", "registered", "failed")  # as written
# Never written: what a `running` status is shown as once no cycle holds the lock (it died unrecorded).
INTERRUPTED = "interrupted"


def read_status(registry: str | Path) -> dict:
    """The status file as the cycle wrote it; {} when none was recorded or it is unreadable."""
    try:
        data = json.loads((Path(registry) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def retrain_status(registry: str | Path) -> dict:
    """The last or ongoing cycle as shown to people: a `running` whose cycle no longer holds the
    lock (killed before it could record its end) is `interrupted`."""
    status = read_status(registry)
    if status.get("state") == "running" and not cycle_running(registry):
        status["state"] = INTERRUPTED
    return status


def describe_status(status: dict) -> str:
    """One line for `/twin status` and `twin retrain`: state (stage, progress while running,
    started, finished), the cycle's version, and why."""
    if not status:
        return "never"
    stage = f"stage {status.get('stage') or '—'}"
    progress = status.get("progress")
    if status.get("state") == "running" and isinstance(progress, (int, float)):
        stage += f" {progress:.0%}"
    line = f"{status.get('state') or '?'} ({stage}, started {_when(status.get('started'))}, "
    line += f"finished {_when(status.get('finished'))})"
    if status.get("version"):
        line += f" {status['version']}"
    if status.get("reason"):
        line += f": {status['reason']}"
    return line


def _when(iso: object) -> str:
    return str(iso)[:16].replace("T", " ") if iso else "—"


# `retrain-cycles.jsonl`, appended by registry_ops.append_cycle when a cycle ends. Keys: started,
# finished, state, stage, version, serving, new_samples, reason, eval, loss (the last training
# loss), steps. Read as hostile: a line that is not such an object is skipped.
MAX_CYCLES = 200
_MAX_CYCLES_BYTES = 4 * 1024 * 1024  # far above 200 real lines; a bigger file is read from its end
_CYCLE_TEXT = ("started", "finished", "state", "stage", "version", "serving", "reason")
_CYCLE_NUMBERS = ("new_samples", "loss", "steps")


def cycle_entry(raw: object) -> dict | None:
    """One cycle log line as shown: known keys of the right type only; None when it has no state."""
    if not isinstance(raw, dict) or not isinstance(raw.get("state"), str):
        return None
    entry: dict = {
        key: str(raw[key])[:1000] if isinstance(raw.get(key), str) else None for key in _CYCLE_TEXT
    }
    for key in _CYCLE_NUMBERS:
        value = raw.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        entry[key] = value if ok else None
    entry["eval"] = raw["eval"] if isinstance(raw.get("eval"), dict) else {}
    return entry


def read_cycles(registry: str | Path, limit: int = MAX_CYCLES) -> list[dict]:
    """The finished cycles, newest first (at most `limit`); malformed lines are skipped."""
    path = Path(registry) / CYCLES_FILE
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - _MAX_CYCLES_BYTES))
            data = handle.read()
    except OSError:
        return []
    entries: list[dict] = []
    for line in reversed(data.decode("utf-8", errors="replace").splitlines()):
        try:
            entry = cycle_entry(json.loads(line))
        except ValueError:
            continue
        if entry is not None:
            entries.append(entry)
            if len(entries) >= limit:
                break
    return entries
