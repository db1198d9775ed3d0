"""`twin health`: ask a running bot's `/twin/health` or `/twin/ready`, as a container's health check.

One line of output and a status (0 healthy, 1 not), with nothing but the Python the image already
has: a slim image carries no curl.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import httpx

HEALTH_PATH = "/twin/health"  # bot/health.py serves both; importing it would load NoneBot
READY_PATH = "/twin/ready"


@dataclass(frozen=True, slots=True)
class Probe:
    """What one probe found: healthy or not, and the one line that says why."""

    healthy: bool
    line: str


def local_url(host: str, port: str | int, path: str) -> str:
    """The bot's URL seen from its own machine: a wildcard listen address is reached on loopback."""
    host = host.strip() or "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}{path}"
    if address.is_unspecified:  # 0.0.0.0 / :: means every interface, loopback among them
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{shown}:{port}{path}"


def probe(url: str, *, token: str | None = None, timeout: float = 5.0) -> Probe:
    """GET `url` (with the access token as Bearer when given); never raises for a sick bot."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        return Probe(False, f"unhealthy: {url}: {type(exc).__name__}: {exc}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return Probe(False, f"unhealthy: {url}: HTTP {response.status_code}, not a qq-twin answer")
    if "ready" in body:
        return _readiness(url, response.status_code, body)
    if response.status_code == 200 and body.get("status") == "ok":
        return Probe(True, f"healthy: {url}")
    if response.status_code == 401:
        return Probe(False, f"unhealthy: {url}: HTTP 401, the access token was refused")
    return Probe(False, f"unhealthy: {url}: HTTP {response.status_code}")


def _shown(value: object, limit: int = 80) -> str:
    """A value from the answer, safe to print on one line (the URL may name any server)."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _readiness(url: str, status: int, body: dict) -> Probe:
    details = (
        f"model {_shown(body.get('model') or 'not loaded')}, "
        f"store {'writable' if body.get('store_writable') is True else 'NOT writable'}, "
        f"{_shown(body.get('onebot_connections', 0))} OneBot connection(s), "
        f"sending {_shown(body.get('sending', '?'))}{', paused' if body.get('paused') is True else ''}"
    )
    if status == 200 and body.get("ready") is True:
        return Probe(True, f"ready: {details}")
    return Probe(False, f"not ready (HTTP {status}): {details}")
