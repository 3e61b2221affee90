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


def test_sandbox_app_name_wins_over_fly_app_name() -> None:
    s = Settings.from_env({**GOOD, "SANDBOX_APP_NAME": "my-sandboxes"})
    assert s.fly_app_name == "my-sandboxes"
    only = {k: v for k, v in GOOD.items() if k != "FLY_APP_NAME"}
    assert Settings.from_env({**only, "SANDBOX_APP_NAME": "x"}).fly_app_name == "x"


def test_on_fly_the_sandbox_app_must_be_named_and_not_be_the_listeners_own() -> None:
    on_fly = {**GOOD, "FLY_MACHINE_ID": "148e21", "FLY_APP_NAME": "my-listener"}
    with pytest.raises(ConfigError) as missing:
        Settings.from_env(on_fly)
    assert "SANDBOX_APP_NAME: required on Fly" in str(missing.value)
    with pytest.raises(ConfigError) as same:
        Settings.from_env({**on_fly, "SANDBOX_APP_NAME": "my-listener"})
    assert "must not be the listener's own app" in str(same.value)
    assert Settings.from_env({**on_fly, "SANDBOX_APP_NAME": "boxes"}).fly_app_name == "boxes"


def test_fly_problem_is_listed_with_the_others() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"FLY_MACHINE_ID": "148e21", "FLY_APP_NAME": "my-listener"})
    assert len(info.value.problems) == 4  # SANDBOX_APP_NAME + three missing variables


def test_empty_secrets_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**GOOD, "FLY_API_TOKEN": "", "SUPABASE_SERVICE_ROLE_KEY": "  "})
    assert sorted(p.split(":")[0] for p in info.value.problems) == [
        "FLY_API_TOKEN",
        "SUPABASE_SERVICE_ROLE_KEY",
    ]


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"SANDBOX_CPUS": "3"}, "SANDBOX_CPUS: must be one of 1, 2, 4, 8, 16"),
        ({"SANDBOX_CPUS": "8", "SANDBOX_MAX_CPUS": "4"}, "must not be less than SANDBOX_CPUS"),
        ({"SANDBOX_MEMORY_MB": "4096"}, "2048 MB per shared CPU"),
        ({"SANDBOX_IDLE_TIMEOUT_S": "60", "SANDBOX_IDLE_WARNING_S": "60"}, "must be shorter"),
        ({"SANDBOX_SMOKE_COMMAND": "echo 'unclosed"}, "cannot be parsed as a command line"),
    ],
)
def test_settings_that_contradict_each_other_are_refused(
    env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**GOOD, **env})
    assert fragment in str(info.value)


def test_a_bad_url_does_not_hide_the_cross_field_problems() -> None:
    env = {
        **GOOD,
        "SUPABASE_URL": "not a url",
        "SANDBOX_CPUS": "3",
        "SANDBOX_MEMORY_MB": "8192",
        "SANDBOX_IDLE_TIMEOUT_S": "60",
        "SANDBOX_IDLE_WARNING_S": "60",
    }
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    names = {problem.split(":", 1)[0] for problem in info.value.problems}
    assert names == {
        "SUPABASE_URL",
        "SANDBOX_CPUS",
        "SANDBOX_IDLE_WARNING_S",
    }, info.value.problems


def test_memory_over_the_per_cpu_ceiling_is_named_with_the_url_problem() -> None:
    env = {**GOOD, "SUPABASE_URL": "nope", "SANDBOX_MEMORY_MB": "4096"}
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    text = str(info.value)
    assert "SUPABASE_URL" in text
    assert "SANDBOX_MEMORY_MB (4096) must not exceed" in text and "2048 MB per shared CPU" in text
