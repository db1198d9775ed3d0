"""`twin doctor`: a setup checked the way a helper on a forum would, one line per check with a fix.

Each check is a function returning `Check`s; the command gathers what they look at (the bot's
settings exactly as `bot.py` would read them, the installed packages, the CPU) and prints them.
Nothing is changed: the store is opened read-only and the model is only loaded. Secrets are
never printed, only whether they are set and how long they are.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from pipeline import registry
from pipeline.errors import InputError, TwinError

if TYPE_CHECKING:
    from bot.config import Config

commands = typer.Typer()

Status = Literal["ok", "warn", "fail"]
DISTRIBUTION = "qq-twin"
KEY_PACKAGES = ("llama-cpp-python", "nonebot2", "nonebot-adapter-onebot", "torch", "transformers")
# The Makefile's LLAMA_CMAKE_ARGS (a test keeps the two equal): portable, because a native build
# (GGML_NATIVE) compiled AMX kernels in on AMX CPUs, and those crashed in decode.
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
_PORTABLE_FEATURES = ("AVX2", "FMA", "F16C")  # what those args switch on; the CPU must have each
NAPCAT_TIMEOUT = 3.0
# A retrain writes into the registry: the candidate's export in the work directory (the merged
# model's f16 GGUF before quantising is at least as big as the serving GGUF), the quantised
# candidate, and its registered copy: about three serving versions. Merging also writes the
# base's weights once more beside a conversion, so a local base counts twice; the larger wins.
RETRAIN_VERSION_COPIES = 3
RETRAIN_BASE_COPIES = 2
_PROBE_MESSAGE = "在吗"
EXPORT_FIX = "twin export RUN -o models/v0001, then twin models promote v0001 -r models (TWIN_MODEL=models)"
_MARK = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]"}


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: what was checked, how it stands, what was seen, and what to do about it."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, "warn", detail, fix)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


# ---------------------------------------------------------------- Python and packages


def check_python(version: Sequence[int], requires_python: str | None) -> Check:
    """The interpreter against the distribution's Requires-Python."""
    from packaging.specifiers import SpecifierSet

    running = ".".join(str(part) for part in version[:3])
    wanted = SpecifierSet(requires_python or ">=3.10")
    if wanted.contains(running, prereleases=True):
        return ok("python", f"{running} (qq-twin needs {wanted})")
    return fail(
        "python", f"{running}, but qq-twin needs {wanted}", f"make a venv with a newer Python ({wanted})"
    )


def check_packages(requirements: Iterable[str] | None, installed: Callable[[str], str | None]) -> Check:
    """Every requirement of this environment installed at or above its floor."""
    from packaging.requirements import Requirement

    if requirements is None:
        return warn(
            "packages",
            f"{DISTRIBUTION} is not installed in this environment, so its floors cannot be read",
            "pip install -e '.[dev]' (or make setup)",
        )
    problems, met = [], 0
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (dev, gpu, demo) or another Python's backport
        have = installed(req.name)
        if have is None:
            problems.append(f"{req.name} missing")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have} (needs {req.specifier})")
        else:
            met += 1
    if problems:
        return fail(
            "packages", "; ".join(problems), "pip install -e . (installs what pyproject.toml requires)"
        )
    shown = ", ".join(f"{name} {have}" for name in KEY_PACKAGES if (have := installed(name)))
    return ok("packages", f"{met} requirements met ({shown})")


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def distribution_requirements() -> tuple[list[str] | None, str | None]:
    """This distribution's requirements and Requires-Python, as installed (None when it is not)."""
    try:
        meta = importlib.metadata.metadata(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None, None
    return importlib.metadata.requires(DISTRIBUTION) or [], meta.get("Requires-Python")


# ---------------------------------------------------------------- llama.cpp and the CPU


def llama_system_info() -> str | None:
    """What llama.cpp was compiled with (`AVX2 = 1 | … | AMX_INT8 = 1 |`); None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    info = llama_cpp.llama_print_system_info()
    return info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags (`avx2`, `amx_int8`…); None where /proc/cpuinfo does not say."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def portable_cmake_args(cpu: frozenset[str] | None) -> str:
    """The Makefile's build arguments, each CPU feature switched off where this CPU lacks it."""
    args = LLAMA_CMAKE_ARGS
    for feature in _PORTABLE_FEATURES:
        if cpu is not None and feature.lower() not in cpu:
            args = args.replace(f"-DGGML_{feature}=ON", f"-DGGML_{feature}=OFF")
    return args


def reinstall_llama(cpu: frozenset[str] | None, version: str | None) -> str:
    pin = f"=={version}" if version else ""
    return (
        f'CMAKE_ARGS="{portable_cmake_args(cpu)}" pip install --no-cache-dir --force-reinstall '
        f"--no-deps llama-cpp-python{pin}"
    )


def check_llama_build(system_info: str | None, cpu: frozenset[str] | None, version: str | None) -> Check:
    """llama.cpp's compiled features against this CPU: no AMX, nothing the CPU lacks, AVX2 if it has it."""
    name, fix = "llama.cpp build", reinstall_llama(cpu, version)
    if system_info is None:
        return fail(name, "llama-cpp-python is not importable", fix)
    built = {key for key, on in re.findall(r"([A-Z][A-Z0-9_]*) = (\d+)", system_info) if on == "1"}
    amx = sorted(key for key in built if key.startswith("AMX"))
    if amx:
        return fail(
            name,
            f"compiled with {', '.join(amx)} (a native build): it crashed in decode on AMX CPUs",
            fix,
        )
    if cpu is not None:
        beyond = [f for f in _PORTABLE_FEATURES if f in built and f.lower() not in cpu]
        if beyond:
            return fail(
                name,
                f"compiled with {', '.join(beyond)}, which this CPU lacks: it stops at the first use",
                fix,
            )
        if "avx2" in cpu and "AVX2" not in built:
            return warn(name, "compiled without AVX2 on an AVX2 CPU: replies several times slower", fix)
        if "avx2" not in cpu:
            return warn(
                name,
                "this CPU has no AVX2: llama.cpp runs, but slowly",
                "serve from a faster machine with TWIN_BACKEND=openai (docs/bot.md)",
            )
    features = ", ".join(f for f in _PORTABLE_FEATURES if f in built) or "no SIMD features"
    return ok(name, f"{features}; no AMX")


# ---------------------------------------------------------------- settings files and the token


def check_env_file(path: Path, settings: Mapping[str, str | None], *, required: bool) -> Check | None:
    """A settings file is yours, readable, and (when it holds a secret) owner-only."""
    from bot.log_mask import secret_values

    name = path.name
    if not path.exists():
        if not required:
            return None
        return warn(name, f"{path}: none; settings come from the environment only", "cp .env.example .env")
    try:
        info = path.stat()
        path.read_bytes()
    except OSError as exc:
        return fail(name, f"{path}: not readable ({exc.strerror})", f"chown $USER {path} && chmod 600 {path}")
    mode = stat.S_IMODE(info.st_mode)
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        return warn(
            name, f"{path}: owned by uid {info.st_uid}, not you", f"chown $USER {path} && chmod 600 {path}"
        )
    if mode & 0o077:
        held = secret_values(settings)
        if held:
            return fail(name, f"{path}: mode {mode:04o}, others can read its secrets", f"chmod 600 {path}")
        return warn(name, f"{path}: mode {mode:04o}, readable by others", f"chmod 600 {path}")
    return ok(name, f"{path}: owner-only ({mode:04o})")


def check_access_token(settings: Mapping[str, str | None], token_file: Path) -> tuple[Check, str | None]:
    """The OneBot access token: configured, kept owner-only by an earlier start, or yet to be made."""
    from bot import transport

    name = "access token"
    configured = transport.configured_token(settings)
    if configured:
        return ok(name, f"ONEBOT_ACCESS_TOKEN set ({len(configured)} characters)"), configured
    try:
        kept = transport.read_token_file(token_file)
    except transport.TokenFileError as exc:
        return fail(name, str(exc), f"rm {token_file}; the next start generates a new one"), None
    if kept is not None:
        return ok(name, f"generated one kept owner-only in {token_file} ({len(kept)} characters)"), kept
    return (
        warn(
            name,
            f"none yet: the first start generates one into {token_file}",
            "start the bot once (twin serve), then give the QQ side that file's content as its token",
        ),
        None,
    )


def check_exposure(settings: Mapping[str, str | None], token: str | None, *, http_post: bool) -> Check:
    """HOST, the token and HTTP POST as `bot.py` will judge them before it serves anything."""
    from bot import transport

    host = settings.get("host") or "127.0.0.1"
    secret = _onebot_setting(settings, "secret") or ""
    # No token yet: the bot generates one of this strength at start, so judge that one.
    effective = token or secrets.token_urlsafe(transport.TOKEN_BYTES)
    listening = transport.transport_problem(host, effective, http_post=False, secret=secret)
    if listening is not None:
        return fail(
            "host/token",
            listening,
            f"set ONEBOT_ACCESS_TOKEN to {transport.GENERATE_HINT}'s output, or HOST=127.0.0.1",
        )
    if http_post and transport.transport_problem(host, effective, http_post=True, secret=secret):
        return fail(
            "host/token",
            "TWIN_ONEBOT_HTTP_POST=true without ONEBOT_SECRET: bot.py refuses to start",
            "set ONEBOT_SECRET to the secret the QQ side signs with, or TWIN_ONEBOT_HTTP_POST=false",
        )
    strength = f"a token of {len(token)} characters" if token else "a token generated at the first start"
    post = ", HTTP POST signed with ONEBOT_SECRET" if http_post else ", no HTTP POST"
    return ok("host/token", f"HOST {host} with {strength}{post}")


def check_console(config: Config, settings: Mapping[str, str | None], token: str | None) -> Check:
    """The operator console as `bot.py` will judge it, and whether its password crosses a network."""
    from bot.console.auth import password_problem
    from bot.transport import is_loopback

    if not config.twin_console:
        return ok("console", "off (TWIN_CONSOLE=true serves it at /twin/console/)")
    fix = (
        'set TWIN_CONSOLE_PASSWORD to python -c "import secrets; print(secrets.token_urlsafe(18))"\'s output'
    )
    problem = password_problem(config.twin_console_password)
    if problem is not None:
        return fail("console", f"{problem}: bot.py refuses to start", fix)
    if token and config.twin_console_password == token:
        return fail("console", "TWIN_CONSOLE_PASSWORD is the OneBot access token", f"give it its own: {fix}")
    if "fastapi" not in (settings.get("driver") or "~fastapi"):
        return fail("console", "the console needs the FastAPI driver", "DRIVER=~fastapi+~websockets")
    host = settings.get("host") or "127.0.0.1"
    if not is_loopback(host):
        return warn(
            "console",
            f"served on HOST {host} over plain HTTP: the password crosses the network readable",
            "keep HOST=127.0.0.1 and use an SSH tunnel or an HTTPS reverse proxy (docs/console.md)",
        )
    return ok(
        "console", f"on at http://{host}:{settings.get('port') or 8080}/twin/console/ with its own password"
    )


def _onebot_setting(settings: Mapping[str, str | None], field: str) -> str | None:
    """An OneBot adapter setting under either name it reads (the `v11` alias wins)."""
    for key in (f"onebot_v11_{field}", f"onebot_{field}"):
        if key in settings:
            return settings[key]
    return None


# ---------------------------------------------------------------- the model


def check_model(model: Path, persona: str) -> list[Check]:
    """The GGUF `TWIN_MODEL` serves: found, sound, loaded by llama.cpp, its template rendered thinking off."""
    try:
        resolved = registry.resolve_model(model)
    except (OSError, InputError) as exc:
        fix = "serve a sound version: twin models promote <version>" if is_registry(model) else EXPORT_FIX
        return [fail("model", f"TWIN_MODEL: {exc}", fix)]
    gguf = resolved.gguf
    try:
        registry.verify_gguf(gguf)
    except InputError as exc:
        return [fail("model", str(exc), "export it again (twin export), or promote another version")]
    try:
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    except Exception as exc:  # llama.cpp reports any load failure as a bare ValueError/RuntimeError
        return [
            fail(
                "model",
                f"{gguf}: llama.cpp cannot load it ({exc})",
                "export it with this llama-cpp-python, or upgrade llama-cpp-python for a newer architecture",
            )
        ]
    try:
        size = gguf.stat().st_size / 2**20
        loaded = ok("model", f"{resolved.version}: {gguf} ({size:.0f} MiB) loads in llama.cpp")
        return [loaded, check_template(llm, gguf, persona)]
    finally:
        llm.close()


def check_template(llm: Any, gguf: Path, persona: str) -> Check:
    """The GGUF's chat template renders a twin prompt with thinking off and tokenises as the bot does."""
    from pipeline.chatformat import render_chat_template, system_prompt
    from pipeline.llama_prompt import prompt_token_ids

    name = "chat template"
    template = llm.metadata.get("tokenizer.chat_template", "")
    if not template:
        return fail(
            name, f"{gguf}: the GGUF carries no tokenizer.chat_template", "export it again (twin export)"
        )
    bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "ignore")
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "ignore")
    messages = [
        {"role": "system", "content": system_prompt(persona)},
        {"role": "user", "content": _PROBE_MESSAGE},
    ]
    try:
        rendered = render_chat_template(template, messages, bos_token=bos, eos_token=eos)
        tokens = prompt_token_ids(llm, template, messages, bos=bos, eos=eos)
    except Exception as exc:  # a template is a program: any error it raises is the finding
        return fail(
            name, f"{gguf}: the template does not render ({exc})", "export it again from a chat model"
        )
    generation = rendered[rendered.rfind(_PROBE_MESSAGE) + len(_PROBE_MESSAGE) :]
    if generation.count("<think>") > generation.count("</think>"):
        return fail(
            name,
            "the prompt ends inside an open <think> block even with enable_thinking=false: "
            "the twin would reason aloud before every reply",
            "serve a model whose template honours enable_thinking (e.g. Qwen3), or an instruct model",
        )
    return ok(name, f"renders with thinking off ({len(tokens)} prompt tokens)")


# ---------------------------------------------------------------- the store


def check_store(db: Path, key: str) -> Check:
    """The conversation store opens (read-only) with `TWIN_DB_KEY` and its schema is one this bot runs."""
    from bot.store import SCHEMA_VERSION, StoreUnreadable, read_schema_version

    if not db.exists():
        return ok("store", f"{db}: not created yet; the first start creates it")
    try:
        version = read_schema_version(db, key)
    except StoreUnreadable as exc:
        if key:
            return fail(
                "store", f"{db}: does not open with TWIN_DB_KEY ({exc})", "set the key it was created with"
            )
        return fail(
            "store", f"{db}: not readable as SQLite ({exc}); encrypted?", "set TWIN_DB_KEY to its key"
        )
    encrypted = "encrypted" if key else "not encrypted"
    if version > SCHEMA_VERSION:
        return fail(
            "store",
            f"{db}: schema v{version} is newer than this qq-twin (v{SCHEMA_VERSION})",
            "upgrade qq-twin to the version that wrote it",
        )
    if version < SCHEMA_VERSION:
        return warn(
            "store",
            f"{db}: schema v{version}, {encrypted}; migrates to v{SCHEMA_VERSION} on the next start",
            "back it up first (cp with its -wal) if you may go back to the older qq-twin",
        )
    return ok("store", f"{db}: opens, {encrypted}, schema v{version}")


# ---------------------------------------------------------------- the registry and the disk


def is_registry(model: Path) -> bool:
    return model.is_dir() and (
        (model / registry.CURRENT_FILE).is_file() or bool(registry.version_names(model))
    )


def check_registry(model: Path) -> list[Check]:
    """`current` names a servable version, and a rollback has somewhere sound to go."""
    if not model.exists():
        return [warn("registry", f"{model}: no registry yet", EXPORT_FIX)]
    if not is_registry(model):
        return [
            warn(
                "registry",
                f"TWIN_MODEL {model} is a single model, not a registry: no rollback, no retrain",
                EXPORT_FIX,
            )
        ]
    versions = registry.version_names(model)
    current = registry.current_version(model)
    promote_fix = f"twin models promote <version> (have: {', '.join(versions) or 'none'})"
    if current is None:
        return [fail("registry", f"{model}: no current version", promote_fix)]
    try:
        registry.check_version(model, current)
    except InputError as exc:
        return [fail("registry", f"current → {current}: {exc.cause}", promote_fix)]
    found = ok("registry", f"{model}: serving {current} ({len(versions)} versions)")
    try:
        targets = registry.rollback_targets(model)
    except InputError as exc:
        return [found, fail("rollback", str(exc), "restore history.json from a backup, or delete it")]
    if not targets:
        return [
            found,
            warn(
                "rollback",
                f"no earlier version to roll back to from {current}",
                "keep the previous version (TWIN_RETRAIN_KEEP >= 2); the next promotion makes one",
            ),
        ]
    try:
        registry.check_version(model, targets[0])
    except InputError as exc:
        return [found, warn("rollback", f"the rollback target is broken: {exc}", promote_fix)]
    return [found, ok("rollback", f"twin models rollback would serve {targets[0]}")]


def retrain_space_needed(model: Path, config: Config, root: Path) -> tuple[int, str]:
    """Bytes a retrain writes into the registry, and how that was estimated ((0, why) when none)."""
    from deploy.retrain import base_model_of

    if not is_registry(model):
        return 0, "no registry to retrain into"
    current = registry.current_version(model)
    try:
        version = registry.get_version(model, current or "")
    except InputError:
        return 0, "no serving version to retrain from"
    serving = _tree_size(version.path)
    needed, how = serving * RETRAIN_VERSION_COPIES, f"{RETRAIN_VERSION_COPIES} × the serving version"
    try:
        base = _under(root, Path(base_model_of(config, version)["base_model"]))
    except InputError:
        base = None
    if base is not None and base.exists() and _tree_size(base) * RETRAIN_BASE_COPIES > needed:
        needed, how = _tree_size(base) * RETRAIN_BASE_COPIES, f"{RETRAIN_BASE_COPIES} × the base model"
    return needed, how


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def check_disk(model: Path, config: Config, root: Path) -> Check:
    """Free space where a retrain writes, against `retrain_space_needed`."""
    needed, how = retrain_space_needed(model, config, root)
    where = model if model.is_dir() else model.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    gib = 2**30
    if needed == 0:
        return ok("disk", f"{free / gib:.1f} GiB free on {where} ({how})")
    line = f"{free / gib:.1f} GiB free on {where}; a retrain needs about {needed / gib:.1f} GiB ({how})"
    if free < needed:
        return fail("disk", line, "free space there, or lower TWIN_RETRAIN_KEEP and run twin retrain again")
    return ok("disk", line)


# ---------------------------------------------------------------- NapCat


def check_napcat(
    settings: Mapping[str, str | None], token: str | None, timeout: float = NAPCAT_TIMEOUT
) -> list[Check]:
    """The QQ side's forward WebSocket (ONEBOT_WS_URLS) answers and takes the token; else how it connects."""
    raw = _onebot_setting(settings, "ws_urls")
    if not raw or not raw.strip():
        host, port = settings.get("host") or "127.0.0.1", settings.get("port") or "8080"
        return [ok("napcat", f"reverse WebSocket: the QQ side connects to ws://{host}:{port}/onebot/v11/ws")]
    try:
        urls = json.loads(raw)
    except ValueError:
        urls = None
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        return [
            fail(
                "napcat",
                "ONEBOT_WS_URLS is not a JSON list of URLs",
                'ONEBOT_WS_URLS=["ws://127.0.0.1:3001"]',
            )
        ]
    return [asyncio.run(probe_websocket(url, token, timeout)) for url in urls]


async def probe_websocket(url: str, token: str | None, timeout: float) -> Check:
    """Open a WebSocket to `url` as the bot would (Bearer token) and close it again."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus, InvalidURI, WebSocketException

    from bot.backends import shown_url

    shown = shown_url(url)  # a password in the URL never reaches the report
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    token_fix = "give the QQ side's WebSocket server the bot's token (ONEBOT_ACCESS_TOKEN or the kept file)"
    try:
        async with connect(url, additional_headers=headers, open_timeout=timeout, close_timeout=timeout):
            pass
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            return fail("napcat", f"{shown}: reachable, but it rejected the token (HTTP {status})", token_fix)
        return fail(
            "napcat", f"{shown}: answered HTTP {status}, not a WebSocket", "check the port in ONEBOT_WS_URLS"
        )
    except InvalidURI:
        return fail("napcat", f"{shown}: not a ws:// URL", 'ONEBOT_WS_URLS=["ws://127.0.0.1:3001"]')
    except ConnectionRefusedError:
        return fail(
            "napcat",
            f"{shown}: connection refused",
            "start NapCat and enable its WebSocket server on that address, or fix ONEBOT_WS_URLS",
        )
    except (OSError, TimeoutError, WebSocketException) as exc:
        return fail(
            "napcat", f"{shown}: unreachable ({exc or type(exc).__name__})", "check the address and firewall"
        )
    return ok("napcat", f"{shown}: reachable, token accepted")


# ---------------------------------------------------------------- the whole setup


def bot_directory(env_file: Path) -> Path:
    """The bot's working directory for `--env-file`: the directory of its `.env` (or the one given)."""
    if env_file.is_dir():
        return env_file.resolve()
    if env_file.name != ".env":
        raise InputError(
            env_file, "the bot reads settings only from a file named .env in its working directory"
        )
    root = env_file.resolve().parent
    if not root.is_dir():
        raise InputError(root, "no such directory")
    return root


def run_checks(root: Path, environ: Mapping[str, str]) -> list[Check]:
    """Every check of the bot that would run in `root` with environment `environ`."""
    from bot import transport
    from bot.config import env_files
    from deploy.settings import load_settings

    requirements, requires_python = distribution_requirements()
    cpu = cpu_flags()
    checks = [
        check_python(sys.version_info, requires_python),
        check_packages(requirements, installed_version),
        check_llama_build(llama_system_info(), cpu, installed_version("llama-cpp-python")),
    ]
    layers = transport.settings_layers(environ, root)
    settings = transport.merge_layers(layers)
    # The environment, the last layer, is no file to check.
    for path, layer, required in zip(env_files(environ, root), layers[:2], (True, False), strict=True):
        found = check_env_file(path, layer, required=required)
        if found is not None:
            checks.append(found)
    try:
        config = load_settings(cwd=root)
    except TwinError as exc:
        return [*checks, fail("settings", str(exc), "fix that line of .env (see .env.example)")]
    checks.append(ok("settings", "every TWIN_* setting valid"))

    db = _under(root, config.twin_db)
    token_check, token = check_access_token(settings, transport.token_file({**settings, "twin_db": str(db)}))
    checks += [token_check, check_exposure(settings, token, http_post=config.twin_onebot_http_post)]
    checks.append(check_console(config, settings, token))

    model = _under(root, Path(config.twin_model))
    if config.twin_backend == "openai":
        from bot.backends import shown_url

        server = shown_url(config.twin_openai_base_url)
        checks.append(ok("model", f"openai backend: {server} serves it (not checked here)"))
    else:
        checks += check_model(model, config.twin_persona)
    checks.append(check_store(db, config.twin_db_key))
    checks += check_registry(model)
    checks.append(check_disk(model, config, root))
    checks += check_napcat(settings, token)
    return checks


def _under(root: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else root / path


def render(checks: Sequence[Check]) -> None:
    """One line per check, its fix indented below when there is something to do."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False, soft_wrap=True)
    width = max(len(c.name) for c in checks)
    for check in checks:
        console.print(f"{_MARK[check.status]} {escape(check.name.ljust(width))}  {escape(check.detail)}")
        if check.fix:
            console.print(f"  {' ' * width}  fix: {escape(check.fix)}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    console.print(f"{failed} failed, {warned} warnings, {len(checks) - failed - warned} ok")


@commands.command("doctor")
def doctor(
    env_file: Annotated[
        Path, typer.Option("--env-file", help="the bot's .env; its directory is the bot's working directory")
    ] = Path(".env"),
    as_json: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
) -> None:
    """Check this setup: packages, llama.cpp build, .env, token, model, store, registry, disk, NapCat."""
    checks = run_checks(bot_directory(env_file), os.environ)
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], ensure_ascii=False, indent=2))
    else:
        render(checks)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)
