"""Liveness and readiness on the bot's own HTTP server.

`GET /twin/health` answers 200 `{"status": "ok"}` to anyone while the process serves and says
nothing else (a container's or systemd's liveness probe needs no secret). `GET /twin/ready`
says whether the twin can answer — model loaded, store writable, a OneBot connection open,
the last retrain, the model server answering, a failed model switch — and shows those
details only to a caller holding the access token (`Authorization: Bearer
<ONEBOT_ACCESS_TOKEN>`); everyone else gets 401 and no detail. With several accounts
(`TWIN_ACCOUNTS`) it lists each, and is ready when every one of them is.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

from nonebot.adapters.onebot.utils import get_auth_bearer
from nonebot.drivers import URL, ASGIMixin, HTTPServerSetup, Request, Response

from bot.accounts import Accounts
from bot.backends import shown_url
from bot.runtime import Twin
from pipeline import registry as model_registry

HEALTH_PATH = "/twin/health"
READY_PATH = "/twin/ready"
_JSON = {"Content-Type": "application/json"}


@dataclass(slots=True)
class Readiness:
    """What `/twin/ready` reports to an operator."""

    model: str | None  # the version serving, None before the model loaded
    store_writable: bool
    onebot_connections: int
    paused: bool
    sending: str  # the send health line of `/twin status`
    last_retrain: str
    server: str | None = None  # the openai backend's server that answered last (failover)
    last_switch: str | None = None  # why the last model switch failed, while the old one serves

    @property
    def ready(self) -> bool:
        return self.model is not None and self.store_writable and self.onebot_connections > 0


async def readiness(twin: Twin | None, onebot_connections: int) -> Readiness:
    """The twin's readiness now (a store write is tried and rolled back)."""
    if twin is None or twin.store is None:
        return Readiness(None, False, onebot_connections, False, "not running", "unknown")
    status = model_registry.retrain_status(twin.registry) if twin.registry is not None else {}
    return Readiness(
        model=twin.backend.version,
        store_writable=await twin.store.writable(),
        onebot_connections=onebot_connections,
        paused=twin.paused,
        sending=twin.health.describe(),
        last_retrain=model_registry.describe_status(status),
        server=shown_url(url) if (url := getattr(twin.backend, "serving_url", None)) is not None else None,
        last_switch=twin.switch_problem,
    )


async def ready_report(accounts: Accounts | None, connected: Collection[str]) -> dict[str, Any]:
    """The body of `/twin/ready` for the QQ accounts connected now (their `self_id`s)."""
    if accounts is None or not accounts.several:
        twin = next(iter(accounts)).twin if accounts is not None else None
        one = await readiness(twin, len(connected))
        return {"ready": one.ready, **asdict(one)}
    listed = []
    for account in accounts:
        here = await readiness(account.twin, int(account.self_id in connected))
        shown = {name: value for name, value in asdict(here).items() if name != "onebot_connections"}
        listed.append(
            {
                "account": account.self_id,
                "ready": here.ready,
                "connected": account.self_id in connected,
                **shown,
                "model_shared_with": list(account.twin.model_shared_with),
            }
        )
    ready = all(entry["ready"] for entry in listed)
    return {"ready": ready, "onebot_connections": len(connected), "accounts": listed}


def authorized(request: Request, token: str) -> bool:
    """The request carries the access token (compared in constant time); never true without one."""
    given = get_auth_bearer(request.headers.get("authorization")) or ""
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def register(
    driver: ASGIMixin,
    running: Callable[[], Accounts | None],
    connections: Callable[[], Collection[str]],
    token: Callable[[], str],
) -> None:
    """Serve both routes on the driver's HTTP server."""

    async def health(_: Request) -> Response:
        return Response(200, headers=_JSON, content=json.dumps({"status": "ok"}))

    async def ready(request: Request) -> Response:
        if not authorized(request, token()):
            return Response(401, headers=_JSON, content=json.dumps({"error": "unauthorized"}))
        body = await ready_report(running(), connections())
        return Response(200 if body["ready"] else 503, headers=_JSON, content=json.dumps(body))

    routes: tuple[tuple[str, str, Callable[[Request], Awaitable[Response]]], ...] = (
        (HEALTH_PATH, "twin-health", health),
        (READY_PATH, "twin-ready", ready),
    )
    for path, name, handler in routes:
        driver.setup_http_server(HTTPServerSetup(URL(path), "GET", name, handler))
