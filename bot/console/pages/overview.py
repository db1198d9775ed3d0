"""Overview: what serves, whether it answers, today's traffic, limits, the last retrain, disk."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from starlette.responses import Response

from bot.backends import shown_url
from bot.console.web import Form, View, action, page
from bot.runtime import midnight
from pipeline import registry as model_registry


def _size(path: Path) -> int:
    """Bytes under `path` (a file or a directory), not following links."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def disk_used(view: View) -> dict[str, str]:
    config = view.twin.config
    db = Path(config.twin_db)
    store = sum(
        _size(Path(f"{db}{suffix}")) for suffix in ("", "-wal", "-shm") if Path(f"{db}{suffix}").exists()
    )
    used = {"store": human_bytes(store)}
    registry = view.twin.registry
    model = Path(config.twin_model)
    if registry is not None:
        used["models"] = human_bytes(_size(registry))
    elif model.exists():
        used["models"] = human_bytes(_size(model))
    return used


@page("/", nav=("概览", "Overview"))
async def overview(view: View) -> Response:
    twin = view.twin
    assert twin.store is not None
    limits = twin.limiter.limits
    connected = view.console.source.connected()
    online = bool(connected) if not view.account.self_id else view.account.self_id in connected
    status = model_registry.retrain_status(twin.registry) if twin.registry is not None else {}
    retrain = model_registry.describe_status(status)
    if twin.retraining() and not retrain.startswith("running"):
        retrain = f"running (was: {retrain})"
    url = getattr(twin.backend, "serving_url", None)
    return view.render(
        "overview.html",
        serving={
            "version": twin.backend.version,
            "backend": twin.backend.name,
            "server": shown_url(url) if url is not None else None,
            "switch_problem": twin.switch_problem,
            "shared_with": list(twin.model_shared_with),
        },
        paused=twin.paused,
        online=online,
        received=await twin.store.count_since(midnight(), "incoming"),
        replied=await twin.store.count_since(midnight(), "twin"),
        sent_today=twin.limiter.sent_today(),
        limits=limits,
        sending=twin.health.describe(),
        halted=twin.health.halted or twin.health.blocked() is not None,
        probability=twin.probability,
        blocked=len(twin.blocked),
        takeovers=len(twin.takeovers()),
        retrain=retrain,
        retrain_state=status.get("state") or "never",
        disk=await asyncio.to_thread(disk_used, view),
    )


@action("/pause")
async def pause(view: View, form: Form) -> str:
    return await view.admin("pause")


@action("/resume")
async def resume(view: View, form: Form) -> str:
    return await view.admin("resume")


@action("/probability")
async def probability(view: View, form: Form) -> str:
    return await view.admin("prob", form.get("probability").strip())
