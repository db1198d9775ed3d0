"""The model registry's on-disk layout: the one module that writes and reads it.

    models/
      current                 text file: the serving version's name (switched atomically)
      retrain-status.json     last/ongoing retrain cycle, read by `/twin status`
      retrain.lock            held (flock) while a retrain cycle runs
      history.json            promotions and rollbacks, oldest first (rollback walks it back)
      <version>/
        manifest.json         base, parent, data window, dataset hash, eval numbers, ggufs, created
        model-<QUANT>.gguf    quantised model(s)
        adapter/              the LoRA adapter (PEFT layout), for incremental retraining

The bot imports only this module of the registry (stdlib only): it resolves what to
serve and notices when `current` changes. `deploy/registry.py` builds the operations
(promote, rollback, keep the last K) on top of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

CURRENT_FILE = "current"
STATUS_FILE = "retrain-status.json"
LOCK_FILE = "retrain.lock"
HISTORY_FILE = "history.json"
MANIFEST_FILE = "manifest.json"
ADAPTER_DIR = "adapter"
QUANT_PREFERENCE = ("Q4_K_M", "Q8_0", "Q5_K_M", "Q6_K", "F16", "BF16", "F32")


@dataclass(slots=True)
class ResolvedModel:
    """What the bot should load: a GGUF file and, when it came from a registry, its version."""

    gguf: Path
    version: str
    manifest: dict = field(default_factory=dict)


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
        return (registry / CURRENT_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def set_current(registry: Path, version: str) -> None:
    """Point `current` at `version` atomically (temp file + rename)."""
    if not (registry / version).is_dir():
        raise FileNotFoundError(f"{registry / version}: no such model version")
    tmp = registry / f".{CURRENT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, registry / CURRENT_FILE)


def pick_gguf(model_dir: Path, manifest: dict, quant: str | None = None) -> Path:
    """The GGUF inside a model directory: the requested quant, else the preferred one present."""
    files: dict[str, str] = dict(manifest.get("gguf") or {})
    if quant:
        order = [quant]
    else:
        default = manifest.get("default_quant")
        order = ([default] if default else []) + list(QUANT_PREFERENCE)
    for q in order:
        if q in files and (model_dir / files[q]).is_file():
            return model_dir / files[q]
        if (model_dir / gguf_name(q)).is_file():
            return model_dir / gguf_name(q)
    found = sorted(model_dir.glob("*.gguf"))
    if found:
        return found[0]
    raise FileNotFoundError(f"{model_dir}: no .gguf model file in this directory")


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
        model_dir = path / version
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
    """Replace the status file atomically (readers never see half a file)."""
    registry = Path(registry)
    tmp = registry / f".{STATUS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(status, ensure_ascii=False, indent=1), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, registry / STATUS_FILE)
