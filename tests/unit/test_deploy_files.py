"""The deploy files agree with each other and with Settings: fly.toml, Dockerfile, lock, Heroku."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import SecretStr

from listener.config import Settings

ROOT = Path(__file__).resolve().parents[2]
FILLED = {
    "SUPABASE_URL": "https://abc.supabase.co",
    "SUPABASE_SERVICE_ROLE_KEY": "service-role-key",
    "FLY_API_TOKEN": "fly-token",
    "FLY_APP_NAME": "sandboxes",
}
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)(\s*;.*)?$")


def toml(name: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / name).read_text())


def lines(name: str) -> list[str]:
    """The file's lines without comments and blanks."""
    return [
        line.strip()
        for line in (ROOT / name).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def seconds(duration: str | int) -> float:
    """A fly.toml duration ("30s", "2m", or bare seconds) in seconds."""
    if isinstance(duration, int):
        return duration
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"unexpected duration {duration!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.fixture(scope="module")
def fly() -> dict[str, Any]:
    return toml("fly.toml")


def test_fly_env_sets_valid_settings_and_no_secret(fly: dict[str, Any]) -> None:
    env = fly["env"]
    secrets = {n.upper() for n, f in Settings.model_fields.items() if f.annotation is SecretStr}
    assert {k.lower() for k in env} <= Settings.model_fields.keys()
    assert not secrets & env.keys(), "secrets go in `fly secrets set`, never in fly.toml"
    settings = Settings.from_env({**FILLED, **env})
    assert str(settings.fly_api_hostname) == "http://_api.internal:4280/"


def test_kill_timeout_covers_the_graceful_drain(fly: dict[str, Any]) -> None:
    grace_s = Settings.model_fields["listener_shutdown_grace_s"].default
    assert fly["kill_signal"] in {"SIGTERM", "SIGINT"}  # the two app.py handles
    assert seconds(fly["kill_timeout"]) >= grace_s + 5


def test_the_health_check_probes_the_port_the_listener_serves(fly: dict[str, Any]) -> None:
    port = int(fly["env"]["LISTENER_HTTP_PORT"])
    (check,) = fly["checks"].values()
    assert (check["type"], check["path"], check["port"]) == ("http", "/healthz", port)
    assert f"EXPOSE {port}" in lines("Dockerfile")


def test_the_listener_is_a_worker_without_public_services(fly: dict[str, Any]) -> None:
    assert "http_service" not in fly
    assert "services" not in fly


def test_the_lock_pins_every_runtime_dependency() -> None:
    pins = {}
    for line in lines("requirements.lock"):
        match = _PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        pins[canonicalize_name(match["name"])] = match["version"]
    for spec in toml("pyproject.toml")["project"]["dependencies"]:
        req = Requirement(spec)
        version = pins.get(canonicalize_name(req.name))
        assert version, f"{req.name} is not in requirements.lock; regenerate it"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version}: {req}"


def test_heroku_installs_the_lock_then_the_package() -> None:
    assert lines("requirements.txt") == ["-r requirements.lock", "."]
    assert lines(".python-version") == ["3.11"]


def test_every_deploy_uses_python_3_11() -> None:
    pyproject = toml("pyproject.toml")
    assert pyproject["project"]["requires-python"] == ">=3.11"
    assert pyproject["tool"]["mypy"]["python_version"] == "3.11"
    (base,) = [line for line in lines("Dockerfile") if line.startswith("FROM ")]
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-\w+", base)


def test_the_docker_context_keeps_what_pip_install_reads() -> None:
    allowed = lines(".dockerignore")
    readme = toml("pyproject.toml")["project"]["readme"]
    assert allowed[0] == "*"
    for needed in ("pyproject.toml", readme, "requirements.lock", "listener"):
        assert f"!{needed}" in allowed
