"""The container and service files, checked without Docker (images cannot be pulled or built here):
the compose wiring, the Dockerfile, .dockerignore and the systemd unit."""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values

from bot.log_mask import is_secret_setting
from deploy.cli import main

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "deploy" / "docker"
COMPOSE_FILES = ("compose.yaml", "llama-server.yaml", "vllm.yaml")
TOKEN = "compose-test-token-0123456789abcdef"


def compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DOCKER / name).read_text(encoding="utf-8"))


def services() -> dict[str, dict]:
    return compose()["services"]


def host_path(volume: str) -> tuple[str, str]:
    """`SOURCE:TARGET[:MODE]` → (source with its `${VAR:-default}` resolved to the default, target)."""
    source, target = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume).split(":")[:2]
    return source, target


def mounts(service: dict) -> dict[str, str]:
    """Container path → host path (or named volume) of a service."""
    return {target: source for source, target in map(host_path, service.get("volumes", []))}


def interpolated(value: str) -> str:
    """A compose value with `${VAR:-default}` at its default (`$$` is a literal `$`)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value).replace("$$", "$")


# ------------------------------------------------------------------------------------------ Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (DOCKER / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def arguments(name: str) -> list[str]:
    return [rest for keyword, rest in dockerfile() if keyword == name]


def exec_form(rest: str) -> list[str]:
    return json.loads(rest)


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for rest in arguments("ARG"):
        name, _, value = rest.partition("=")
        defaults[name] = value.strip('"')
    return defaults


def test_the_image_starts_from_pinned_bases_with_a_cuda_build_argument() -> None:
    base = arg_defaults()["BASE_IMAGE"]
    assert base.startswith("python:3.11-slim") and ":latest" not in base
    assert arguments("FROM") == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]
    # The CUDA variant is the same file with BASE_IMAGE and EXTRAS=gpu; `gpu` must be a real extra.
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    assert "--build-arg BASE_IMAGE=nvidia/cuda:" in text and "--build-arg EXTRAS=gpu" in text
    assert any('pip install -e ".${EXTRAS:+[$EXTRAS]}"' in run for run in arguments("RUN"))
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^gpu = \[", pyproject, re.M)


def test_llama_cpp_and_torch_are_built_as_the_makefile_builds_them() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    make = dict(re.findall(r"^(LLAMA_CMAKE_ARGS|TORCH_SPEC) \?= (.+)$", makefile, re.M))
    defaults = arg_defaults()
    assert defaults["LLAMA_CMAKE_ARGS"] == make["LLAMA_CMAKE_ARGS"]
    assert defaults["TORCH_SPEC"] == make["TORCH_SPEC"]
    assert any(
        'CMAKE_ARGS="${LLAMA_CMAKE_ARGS}"' in run and "llama-cpp-python" in run for run in arguments("RUN")
    )


def test_the_image_runs_twin_serve_as_a_fixed_non_root_user() -> None:
    (user,) = arguments("USER")
    uid = user.split(":")[0]
    uid = arg_defaults()[uid[2:-1]] if uid.startswith("${") else uid
    assert uid.isdigit() and int(uid) != 0
    assert exec_form(arguments("CMD")[-1]) == ["twin", "serve"]
    assert arguments("STOPSIGNAL") == ["SIGTERM"]
    assert arguments("WORKDIR")[-1] == "/app"


def test_the_image_keeps_the_store_and_the_registry_on_volumes() -> None:
    volumes = set(exec_form(arguments("VOLUME")[-1]))
    assert {"/app/data", "/app/models"} <= volumes
    env = dict(item.split("=", 1) for rest in arguments("ENV") for item in shlex.split(rest))
    assert Path(env["TWIN_DB"]).parent.as_posix() in volumes and env["TWIN_MODEL"] in volumes
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8080"


def test_the_health_check_is_a_real_twin_command(capsys: pytest.CaptureFixture[str]) -> None:
    healthcheck = arguments("HEALTHCHECK")[-1]
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "twin"
    assert main([*command[1:], "--help"]) == 0
    assert "healthy" in capsys.readouterr().out
    assert services()["twin"]["healthcheck"]["test"] == ["CMD", *command]


# ------------------------------------------------------------------------------------------ .dockerignore


def ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    decision = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negated = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/").removeprefix("**/")
        if any(
            fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p.split("/")[-1], pattern)
            for p in prefixes
        ):
            decision = not negated
    return decision


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".env.prod",
        "data/bot.db",
        "data/onebot-token",
        "models/current",
        "models/v0001/model-Q4_K_M.gguf",
        ".venv/bin/python",
        "napcat/config/onebot11_123456.json",
        "runs/r1/adapter/adapter_model.safetensors",
        "dataset/train.jsonl",
        ".git/config",
    ],
)
def test_personal_data_models_and_secrets_stay_out_of_the_build_context(path: str) -> None:
    assert ignored(path)


@pytest.mark.parametrize(
    "path",
    ["bot.py", "pyproject.toml", ".env.example", "bot/config.py", "deploy/docker/Dockerfile", "README.md"],
)
def test_the_source_is_in_the_build_context(path: str) -> None:
    assert (ROOT / path).exists() and not ignored(path)


# ------------------------------------------------------------------------------------------ compose


def test_the_bot_serves_from_the_env_file_with_its_state_on_volumes() -> None:
    twin = services()["twin"]
    assert twin["command"] == ["twin", "serve"] and twin["env_file"] == "../../.env"
    assert (DOCKER / twin["env_file"]).resolve() == ROOT / ".env"
    volumes = mounts(twin)
    assert (DOCKER / volumes["/app/data"]).resolve() == ROOT / "data"
    assert (DOCKER / volumes["/app/models"]).resolve() == ROOT / "models"
    env = twin["environment"]
    assert Path(env["TWIN_DB"]).parent.as_posix() in volumes and env["TWIN_MODEL"] in volumes
    assert env["HOST"] == "0.0.0.0"
    assert "user" not in twin or str(twin["user"]).split(":")[0] not in ("0", "root")
    assert twin["stop_signal"] == "SIGTERM" and twin["restart"] == "unless-stopped"


def test_napcat_dials_the_twin_service_with_the_one_token(tmp_path: Path, monkeypatch) -> None:
    """Run the compose file's napcat-config command with the twin's environment, as compose would."""
    every = services()
    twin, writer, napcat = every["twin"], every["napcat-config"], every["napcat"]
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"ONEBOT_ACCESS_TOKEN={TOKEN}\nHOST=127.0.0.1\n", encoding="utf-8")
    # Both read the token from the same env_file; neither sets it anywhere else.
    assert writer["env_file"] == twin["env_file"]
    for service in every.values():
        assert "ONEBOT_ACCESS_TOKEN" not in (service.get("environment") or {})
    env = {**dotenv_values(dotenv), **{k: interpolated(str(v)) for k, v in writer["environment"].items()}}
    for name, value in env.items():
        monkeypatch.setenv(name, value or "")
    monkeypatch.chdir(tmp_path)
    # The writer's config directory is NapCat's config volume.
    out_in_container = writer["command"][writer["command"].index("--out") + 1]
    assert mounts(writer)[out_in_container] == mounts(napcat)["/app/napcat/config"]
    command = writer["command"]
    assert command[:2] == ["twin", "napcat-config"]
    argv = [*command[1:]]
    argv[argv.index("--out") + 1] = str(tmp_path / "napcat-config")
    assert main(argv) == 0
    config = json.loads((tmp_path / "napcat-config" / "onebot11.json").read_text(encoding="utf-8"))
    (client,) = config["network"]["websocketClients"]
    url = urlsplit(client["url"])
    assert client["token"] == TOKEN
    assert url.hostname in every and url.hostname == "twin"
    assert str(url.port) == twin["environment"]["PORT"] and url.path == "/onebot/v11/ws"
    # NapCat starts only after its config was written, and reads it as the same user that wrote it.
    assert napcat["depends_on"]["napcat-config"]["condition"] == "service_completed_successfully"
    uid = interpolated(writer["user"]).split(":")[0]
    assert uid == interpolated(napcat["environment"]["NAPCAT_UID"]) and uid != "0"
    assert writer["environment"]["NAPCAT_ACCOUNT"] == napcat["environment"]["ACCOUNT"]


def test_everything_that_must_survive_a_restart_is_on_a_volume() -> None:
    every = services()
    assert {"/app/data", "/app/models", "/app/.cache"} <= mounts(every["twin"]).keys()
    napcat = mounts(every["napcat"])
    assert napcat["/app/.config/QQ"] in compose()["volumes"]  # the QQ login: no new QR code
    assert (DOCKER / napcat["/app/napcat/config"]).resolve() == ROOT / "napcat" / "config"
    assert "/napcat/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    for name, service in every.items():
        for source, _ in map(host_path, service.get("volumes", [])):
            assert source.startswith(".") or source in compose()["volumes"], (name, source)


def test_napcats_webui_is_published_on_loopback_only() -> None:
    (port,) = services()["napcat"]["ports"]
    assert interpolated(port).startswith("127.0.0.1:") and interpolated(port).endswith(":6099")


def test_logs_rotate_for_every_long_running_service() -> None:
    for name, service in services().items():
        logging = service.get("logging")
        assert logging and logging["driver"] == "json-file", name
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 2, name


def test_retrain_is_a_one_shot_on_the_bots_volumes_and_settings(capsys) -> None:
    every = services()
    retrain, twin = every["retrain"], every["twin"]
    assert retrain["profiles"] == ["retrain"] and retrain["command"] == ["twin", "retrain", "--now"]
    assert retrain["restart"] == "no" and retrain["healthcheck"] == {"disable": True}
    assert every["napcat-config"]["healthcheck"] == {"disable": True}  # one-shots serve no HTTP
    assert retrain["volumes"] == twin["volumes"] and retrain["env_file"] == twin["env_file"]
    assert retrain["environment"] == twin["environment"]
    assert main(["retrain", "--help"]) == 0 and "--now" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("profile", "port", "extra"),
    [
        ("llama-server", 8080, {}),
        ("vllm", 8000, {"TWIN_OPENAI_LORA": "true", "TWIN_VLLM_RUNTIME_LORA": "true"}),
    ],
)
def test_each_model_server_profile_has_an_override_that_switches_the_bot(
    profile: str, port: int, extra: dict[str, str]
) -> None:
    server = services()[profile]
    assert server["profiles"] == [profile]
    launch = " ".join(server.get("entrypoint") or []) + " " + str(server.get("command", ""))
    assert f"--port {port}" in launch and "--host 0.0.0.0" in launch
    override = compose(f"{profile}.yaml")["services"]["twin"]
    env = override["environment"]
    assert env["TWIN_BACKEND"] == "openai"
    url = urlsplit(env["TWIN_OPENAI_BASE_URL"])
    assert (url.hostname, url.port, url.path) == (profile, port, "/v1")
    assert override["depends_on"][profile]["condition"] == "service_healthy"
    healthcheck = server.get("healthcheck") or compose(f"{profile}.yaml")["services"][profile]["healthcheck"]
    assert f":{port}/health" in " ".join(healthcheck["test"])
    for name, value in extra.items():
        assert env[name] == value
    # The registry is mounted where the bot sees it, so paths agree (adapters, `current`).
    assert mounts(server)["/app/models"] == mounts(services()["twin"])["/app/models"]


def test_llama_server_serves_the_gguf_that_current_names() -> None:
    script = services()["llama-server"]["entrypoint"][-1]
    assert "cat /app/models/current" in script
    assert '-m "/app/models/$$v/model-$$LLAMA_QUANT.gguf"' in script  # pipeline.registry.gguf_name
    from pipeline.registry import gguf_name

    assert gguf_name("Q4_K_M") == "model-Q4_K_M.gguf"
    assert 'case "$$v" in ""|.*|*[!A-Za-z0-9._-]*)' in script  # a hostile name is no path


def test_vllm_reserves_a_gpu_and_may_load_adapters_at_runtime() -> None:
    vllm = services()["vllm"]
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in vllm["command"] and "--model ${VLLM_BASE_MODEL" in vllm["command"]


# ------------------------------------------------------------------------------------------ secrets, docs


def compose_and_docker_texts() -> dict[str, str]:
    files = [DOCKER / name for name in COMPOSE_FILES] + [DOCKER / "Dockerfile"]
    return {path.name: path.read_text(encoding="utf-8") for path in files}


def test_no_secret_value_is_baked_into_the_files() -> None:
    for name in COMPOSE_FILES:
        for service_name, service in compose(name)["services"].items():
            for key, value in (service.get("environment") or {}).items():
                if is_secret_setting(key):
                    assert re.fullmatch(r"\$\{\w+:-\}", str(value)), (name, service_name, key)
    for name, text in compose_and_docker_texts().items():
        assert not re.search(r"(TOKEN|SECRET|KEY|PASSWORD)\s*[=:]\s*[\"']?[A-Za-z0-9_\-]{8,}", text), name
    for rest in arguments("ENV") + arguments("ARG"):
        assert not is_secret_setting(rest.split("=")[0]), rest


def test_every_variable_the_compose_files_read_is_documented() -> None:
    documented = (ROOT / ".env.example").read_text(encoding="utf-8") + (
        ROOT / "docs" / "deploy.md"
    ).read_text(encoding="utf-8")
    for name in COMPOSE_FILES:
        text = (DOCKER / name).read_text(encoding="utf-8").replace("$$", "")
        for variable in re.findall(r"\$\{(\w+)", text):
            assert f"`{variable}`" in documented or f"{variable}=" in documented, (name, variable)


# ------------------------------------------------------------------------------------------ systemd


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(ROOT / "deploy" / "systemd" / "qq-twin.service", encoding="utf-8")
    return parser


def test_the_systemd_unit_runs_twin_serve_and_restarts_on_failure() -> None:
    service = unit()["Service"]
    assert service["Type"] == "simple" and service["User"] not in ("root", "0")
    assert service["ExecStart"].split() == [f"{service['WorkingDirectory']}/.venv/bin/twin", "serve"]
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "2"
    assert service["EnvironmentFile"]
    # bot.py stops on SIGTERM and gives a retrain child 20 s: systemd must wait longer than that.
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 20
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_the_systemd_unit_may_write_only_the_store_the_registry_and_caches() -> None:
    service = unit()["Service"]
    assert service["NoNewPrivileges"] == "true" and service["PrivateTmp"] == "true"
    assert service["ProtectSystem"] == "strict" and service["UMask"] == "0077"
    writable = service["ReadWritePaths"].split()
    home = service["WorkingDirectory"]
    assert {f"{home}/data", f"{home}/models"} <= set(writable)
    assert all(path.startswith(home + "/") for path in writable)
