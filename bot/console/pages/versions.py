"""Versions: the registry's versions with their numbers, plots across them, promote and rollback,
and each version's replies to the same held-out prompts next to the owner's real reply."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from starlette.responses import Response

from bot.console.plots import Series, line_svg
from bot.console.web import Form, View, action, page, svg_image
from pipeline import registry as model_registry

CONTEXT_TURNS = 4  # the last turns of a probe shown above the replies


@dataclass(slots=True)
class VersionRow:
    name: str
    created: str = "—"
    parent: str = "—"
    window: str = "—"
    messages: str = "—"
    samples: str = "—"
    perplexity: float | None = None
    style: float | None = None
    quants: str = "—"
    problem: str = ""  # a manifest that does not read
    replies: dict[str, str] = field(default_factory=dict)  # probe id → this version's reply


def _date(stamp: object) -> str:
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and stamp > 0:
        return time.strftime("%Y-%m-%d", time.localtime(stamp))
    return "…"


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _count(value: object) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "—"


def version_row(registry: Path, name: str, probes: str | None) -> VersionRow:
    """One version as the table shows it; a manifest that does not read is shown, not raised."""
    try:
        version = model_registry.get_version(registry, name)
    except model_registry.RegistryError as exc:
        return VersionRow(name, problem=str(exc))
    manifest = version.manifest
    window = manifest.get("data_window") if isinstance(manifest.get("data_window"), dict) else {}
    quants = manifest.get("gguf") if isinstance(manifest.get("gguf"), dict) else {}
    quants = quants or model_registry.ggufs_in(version.path)
    return VersionRow(
        name,
        created=version.created[:16].replace("T", " ") or "—",
        parent=str(version.parent or "—"),
        window=f"{_date(window.get('since'))} – {_date(window.get('until'))}" if window else "—",
        messages=_count(window.get("messages")),
        samples=_count(window.get("samples")),
        perplexity=_number(version.eval.get("perplexity")),
        style=_number(version.eval.get("style_distance")),
        quants=", ".join(sorted(str(q) for q in quants)) or "—",
        replies=model_registry.read_samples(version.path, probes),
    )


def read_registry(registry: Path) -> dict:
    """The versions (oldest first), the probes, what serves and what a rollback returns to;
    what does not read is a line in `problems`, never an error page."""
    problems = []
    try:
        probes = model_registry.read_probes(registry)
    except model_registry.RegistryError as exc:
        probes = []
        problems.append(str(exc))
    try:
        previous = model_registry.previous_version(registry)
    except model_registry.RegistryError as exc:
        previous = None
        problems.append(str(exc))
    digest = model_registry.probes_hash(registry) if probes else None
    return {
        "rows": [version_row(registry, name, digest) for name in model_registry.version_names(registry)],
        "probes": probes,
        "current": model_registry.current_version(registry),
        "previous": previous,
        "problems": problems,
    }


def plots(rows: list[VersionRow]) -> dict[str, str]:
    """Held-out perplexity and style distance per version, as <img src> values."""
    names = [row.name for row in rows]

    def one(values: list[float | None], label: str) -> str:
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        series = Series(label, [i for i, _ in points], [v for _, v in points])
        return svg_image(line_svg([series], xlabel="version", ylabel=label, xticks=names))

    return {
        "ppl": one([row.perplexity for row in rows], "held-out perplexity"),
        "style": one([row.style for row in rows], "style distance"),
    }


def probe_context(probe: model_registry.Probe) -> list[dict[str, str]]:
    """The last turns before the owner's reply (the system prompt is not shown)."""
    return [m for m in probe.messages if m["role"] != "system"][-CONTEXT_TURNS:]


@page("/versions", nav=("版本", "Versions"))
async def versions(view: View) -> Response:
    twin = view.twin
    registry = twin.registry
    if registry is None:
        return view.render("versions.html", registry=None, serving=twin.backend.version, rows=[])
    read = await asyncio.to_thread(read_registry, registry)
    images = await asyncio.to_thread(plots, read["rows"])
    return view.render(
        "versions.html",
        registry=str(registry),
        serving=twin.backend.version,
        current=read["current"],
        previous=read["previous"],
        rows=read["rows"],
        images=images,
        probes=[(probe, probe_context(probe)) for probe in read["probes"]],
        problems=read["problems"],
        shared=list(twin.model_shared_with),
    )


@action("/promote")
async def promote(view: View, form: Form) -> str:
    version = form.get("version").strip()
    if not model_registry.is_version_name(version):
        return "not a version name"
    if version not in view.twin.versions():
        return f"no version {version} in the registry"
    return await view.admin("model", version)


@action("/rollback")
async def rollback(view: View, form: Form) -> str:
    return await view.admin("rollback")


@action("/samples")
async def samples(view: View, form: Form) -> str:
    return await view.admin("samples")
