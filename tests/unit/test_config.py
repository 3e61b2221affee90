"""Settings.from_env: defaults, bounds, and one error naming every bad variable, never a secret."""

from __future__ import annotations

import pytest

from listener.config import Settings
from listener.errors import ConfigError

GOOD = {
    "SUPABASE_URL": "http://127.0.0.1:54321",
    "SUPABASE_SERVICE_ROLE_KEY": "service-secret-value",
    "FLY_API_TOKEN": "fly-secret-value",
    "FLY_APP_NAME": "sandboxes",
}


def test_defaults() -> None:
    s = Settings.from_env(GOOD)
    assert s.sandbox_idle_timeout_s == 1800
    assert s.listener_sweep_interval_s == 60
    assert str(s.fly_api_hostname) == "https://api.machines.dev/"
    assert s.sandbox_smoke_command == "echo Hello from sandbox"
    assert s.allowed_regions == frozenset({"iad"})
    assert s.http_port is None


def test_missing_required_variables_are_all_named() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({})
    text = str(info.value)
    for name in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "FLY_API_TOKEN", "FLY_APP_NAME"):
        assert f"{name}: required but not set" in text
    assert len(info.value.problems) == 4


def test_every_bad_value_is_named_and_no_secret_is_printed() -> None:
    env = {
        **GOOD,
        "SUPABASE_URL": "not a url",
        "FLY_APP_NAME": "",
        "SANDBOX_MEMORY_MB": "1000",
        "SANDBOX_CPU_KIND": "gpu",
        "LISTENER_CONCURRENCY": "0",
        "LOG_LEVEL": "loud",
    }
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    text = str(info.value)
    for name in (
        "SUPABASE_URL",
        "FLY_APP_NAME",
        "SANDBOX_MEMORY_MB",
        "SANDBOX_CPU_KIND",
        "LISTENER_CONCURRENCY",
        "LOG_LEVEL",
    ):
        assert name in text
    assert len(info.value.problems) == 6
    assert "service-secret-value" not in text and "fly-secret-value" not in text


def test_secrets_are_not_in_repr() -> None:
    s = Settings.from_env(GOOD)
    assert "fly-secret-value" not in repr(s)
    assert "service-secret-value" not in repr(s)
    assert s.fly_api_token.get_secret_value() == "fly-secret-value"


def test_allowed_regions_and_port_fallback() -> None:
    s = Settings.from_env({**GOOD, "SANDBOX_ALLOWED_REGIONS": "ord, sjc ,", "PORT": "8080"})
    assert s.allowed_regions == frozenset({"iad", "ord", "sjc"})
    assert s.http_port == 8080
    s2 = Settings.from_env({**GOOD, "PORT": "8080", "LISTENER_HTTP_PORT": "9090"})
    assert s2.http_port == 9090


def test_case_insensitive_enums() -> None:
    s = Settings.from_env({**GOOD, "LOG_LEVEL": "DEBUG", "LOG_FORMAT": "JSON"})
    assert s.log_level == "debug"
    assert s.log_format == "json"
