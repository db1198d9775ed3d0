"""Learning: what the next retrain would learn, its schedule, the running cycle, past cycles."""

from __future__ import annotations

import asyncio
from datetime import datetime

from starlette.responses import Response

from bot.console.plots import Series, line_svg
from bot.console.web import Form, View, action, page, svg_image
from pipeline import registry as model_registry

CYCLES_SHOWN = 50
GATE_PLOT_MIN_CYCLES = 2  # a trend needs two points


def when(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp > 0 else ""


def short_time(iso: object) -> str:
    return str(iso)[:19].replace("T", " ") if iso else "—"


def number(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def gate_numbers(cycle: dict) -> dict[str, str]:
    """Candidate vs serving held-out perplexity and style distance, as text ("—" when missing)."""
    numbers = cycle.get("eval") or {}
    candidate = numbers.get("candidate") if isinstance(numbers.get("candidate"), dict) else {}
    serving = numbers.get("serving") if isinstance(numbers.get("serving"), dict) else {}
    return {
        "ppl": f"{number(candidate.get('perplexity'))} / {number(serving.get('perplexity'))}",
        "style": f"{number(candidate.get('style_distance'))} / {number(serving.get('style_distance'))}",
    }


def loss_points(status: dict) -> tuple[list[float], list[float]]:
    """The status file's [[step, loss], …], hostile-proof: only pairs of finite numbers."""
    xs: list[float] = []
    ys: list[float] = []
    for point in status.get("losses") or []:
        if isinstance(point, list) and len(point) == 2 and all(_finite(v) for v in point):
            xs.append(float(point[0]))
            ys.append(float(point[1]))
    return xs, ys


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")


def loss_plot(xs: list[float], ys: list[float]) -> str:
    return svg_image(line_svg([Series("loss", xs, ys)], xlabel="step", ylabel="training loss"))


def gate_plot(cycles: list[dict]) -> str | None:
    """Candidate held-out perplexity of the cycles that were evaluated, oldest first; None when too few."""
    evaluated = [c for c in reversed(cycles) if _finite(_candidate(c).get("perplexity"))]
    if len(evaluated) < GATE_PLOT_MIN_CYCLES:
        return None
    # The version a cycle made names it; a rejected one (no version) by when it started.
    ticks = [str(c.get("version") or str(c.get("started") or "")[5:16].replace("T", " ")) for c in evaluated]
    series = [
        Series("candidate", range(len(evaluated)), [float(_candidate(c)["perplexity"]) for c in evaluated]),
        Series(
            "serving",
            [i for i, c in enumerate(evaluated) if _finite(_serving(c).get("perplexity"))],
            [float(_serving(c)["perplexity"]) for c in evaluated if _finite(_serving(c).get("perplexity"))],
        ),
    ]
    return svg_image(line_svg(series, xlabel="cycle", ylabel="held-out perplexity", xticks=ticks))


def _candidate(cycle: dict) -> dict:
    value = (cycle.get("eval") or {}).get("candidate")
    return value if isinstance(value, dict) else {}


def _serving(cycle: dict) -> dict:
    value = (cycle.get("eval") or {}).get("serving")
    return value if isinstance(value, dict) else {}


def read_registry(registry) -> tuple[int, str | None, dict, list[dict]]:
    """The next window's start (or a problem), the status and the cycle log (disk: run in a thread)."""
    problem = None
    try:
        since = model_registry.next_window_start(registry)
    except model_registry.RegistryError as exc:
        since, problem = 0, str(exc)
    status = model_registry.retrain_status(registry)
    cycles = model_registry.read_cycles(registry, CYCLES_SHOWN)
    return since, problem, status, cycles


@page("/learning", nav=("学习", "Learning"))
async def learning(view: View) -> Response:
    twin = view.twin
    assert twin.store is not None
    config = twin.config
    registry = twin.registry
    since, problem, status, cycles = 0, None, {}, []
    if registry is not None:
        since, problem, status, cycles = await asyncio.to_thread(read_registry, registry)
    preview = await twin.store.learning_preview(
        since, config.twin_retrain_include_approved, burst_gap=config.twin_burst_gap
    )
    running = twin.retraining() or status.get("state") == "running"
    # A cycle just started (memories refresh first) has no status of its own yet: `live` is empty.
    live = status if status.get("state") == "running" else {}
    if status.get("state") == model_registry.INTERRUPTED and not any(
        c.get("started") == status.get("started") for c in cycles
    ):
        # Died unrecorded: the next cycle logs it; until then it is shown from the status file.
        entry = model_registry.cycle_entry(status)
        if entry is not None:
            cycles.insert(0, entry)
    curve = None
    xs, ys = loss_points(status)
    if xs and (live or status.get("state") == model_registry.INTERRUPTED):
        curve = await asyncio.to_thread(loss_plot, xs, ys)
    trend = await asyncio.to_thread(gate_plot, cycles)
    return view.render(
        "learning.html",
        registry=registry,
        shared_with=list(twin.model_shared_with),
        problem=problem,
        since=when(since),
        preview=preview,
        min_samples=config.twin_retrain_min_samples,
        cron=config.twin_retrain_cron,
        next_run=view.console.source.next_retrain(view.account),
        running=running,
        status=status,
        live=live,
        progress=live.get("progress") if _finite(live.get("progress")) else None,
        curve=curve,
        cycles=[{**c, **gate_numbers(c)} for c in cycles],
        trend=trend,
        short_time=short_time,
        number=number,
        when=when,
    )


@action("/retrain")
async def retrain(view: View, form: Form) -> str:
    return await view.admin("retrain")
