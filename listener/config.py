"""Settings: the one typed, validated view of the environment (the only reader of env vars)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from listener.errors import ConfigError

CpuKind = Literal["shared", "performance"]
ALLOWED_CPUS = (1, 2, 4, 8, 16)
MB_PER_CPU = {"shared": 2048, "performance": 8192}  # Fly: the most memory each CPU kind may have


def memory_per_cpu_mb(cpu_kind: str) -> int:
    """The most memory Fly allows per CPU of this kind."""
    return MB_PER_CPU.get(cpu_kind, MB_PER_CPU["shared"])


class Settings(BaseSettings):
    """Everything the listener can be told, with units in the names and safe defaults."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    # Supabase
    supabase_url: AnyHttpUrl = Field(description="Project URL, e.g. https://abc.supabase.co")
    supabase_service_role_key: SecretStr = Field(
        description="Service-role key (bypasses RLS); never logged"
    )

    # Fly
    fly_api_token: SecretStr = Field(
        description="Fly API token (deploy or org token); never logged"
    )
    fly_app_name: str = Field(min_length=1, description="Fly app that holds the sandbox machines")
    sandbox_app_name: str | None = Field(
        default=None,
        description="Overrides FLY_APP_NAME; required on Fly, where the platform sets "
        "FLY_APP_NAME to the listener's own app",
    )
    fly_api_hostname: AnyHttpUrl = Field(
        default=AnyHttpUrl("https://api.machines.dev"),
        description="Machines API base URL (http://_api.internal:4280 inside Fly)",
    )
    fly_rate_per_s: float = Field(
        default=1.0, gt=0, description="Per-action, per-machine request rate Fly allows"
    )
    fly_burst: int = Field(default=3, ge=1, description="Burst Fly allows above the rate")
    fly_get_rate_per_s: float = Field(default=5.0, gt=0, description="Get Machine rate Fly allows")
    fly_get_burst: int = Field(default=10, ge=1, description="Get Machine burst Fly allows")
    fly_max_attempts: int = Field(
        default=5, ge=1, le=20, description="Attempts per idempotent Fly call"
    )

    # The sandbox machine
    sandbox_image: str = Field(
        default="registry.fly.io/sandbox-listener-sandbox:latest",
        min_length=1,
        description="Image for sandbox machines (pin by digest in production)",
    )
    sandbox_region: str = Field(default="iad", min_length=1, description="Default region")
    sandbox_allowed_regions: str = Field(
        default="",
        description="Comma list of other regions a row may ask for",
    )
    sandbox_cpu_kind: CpuKind = Field(default="shared", description="shared | performance")
    sandbox_cpus: int = Field(default=1, ge=1, le=16, description="vCPUs per sandbox")
    sandbox_max_cpus: int = Field(
        default=4, ge=1, le=16, description="Most vCPUs a row may ask for"
    )
    sandbox_memory_mb: int = Field(
        default=1024, ge=256, le=32768, description="Memory per sandbox (multiple of 256)"
    )
    sandbox_max_memory_mb: int = Field(
        default=4096, ge=256, le=32768, description="Largest memory a row may ask for"
    )
    sandbox_idle_timeout_s: int = Field(
        default=1800, ge=1, description="Destroy after this long without activity"
    )
    sandbox_max_lifetime_s: int = Field(
        default=14400, ge=60, description="Destroy after this age whatever the activity"
    )
    sandbox_idle_warning_s: int = Field(
        default=300, ge=0, description="Record an idle_warning this long before reaping (0: off)"
    )
    sandbox_max_live_per_user: int = Field(
        default=5,
        ge=0,
        description="Sandboxes one user may have provisioning or ready at once (0: no limit)",
    )
    sandbox_command_max_timeout_s: int = Field(
        default=300, ge=1, le=3600, description="Longest timeout_s a queued command may ask for"
    )
    sandbox_command_output_limit_bytes: int = Field(
        default=65536, ge=1024, description="stdout and stderr are each truncated to this"
    )
    sandbox_smoke_command: str = Field(
        default="echo Hello from sandbox",
        description="Command run once a machine starts; empty disables",
    )

    # Listener tunables
    listener_sweep_interval_s: float = Field(default=60.0, gt=0, description="Sweeper period")
    listener_poll_interval_s: float = Field(
        default=5.0, gt=0, description="Catch-up scan period (Realtime is only a hint)"
    )
    listener_concurrency: int = Field(
        default=16, ge=1, le=1024, description="Concurrent session operations"
    )
    listener_lease_s: int = Field(default=120, ge=2, description="Claim lease length")
    listener_orphan_grace_s: float = Field(
        default=120.0, ge=0, description="Never reap a machine younger than this"
    )
    listener_max_attempts: int = Field(
        default=3, ge=1, le=20, description="Provisioning attempts before a row is failed"
    )
    listener_retry_base_s: float = Field(
        default=5.0, gt=0, description="First provisioning retry delay (doubles each attempt)"
    )
    listener_retry_max_s: float = Field(default=300.0, gt=0, description="Longest retry delay")
    listener_shutdown_grace_s: float = Field(
        default=25.0, ge=0, description="Time in-flight work gets after SIGTERM"
    )
    listener_destroy_on_shutdown: bool = Field(
        default=False, description="Destroy every sandbox on shutdown (single-process setups)"
    )
    listener_http_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve /healthz, /readyz, /metrics here"
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Platform port (Fly, Heroku)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug | info | warning | error"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: JSON unless stderr is a terminal"
    )

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("supabase_service_role_key", "fly_api_token")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("sandbox_memory_mb", "sandbox_max_memory_mb")
    @classmethod
    def _multiple_of_256(cls, value: int) -> int:
        if value % 256:
            raise ValueError("must be a multiple of 256")
        return value

    @field_validator("sandbox_cpus", "sandbox_max_cpus")
    @classmethod
    def _allowed_cpus(cls, value: int) -> int:
        if value not in ALLOWED_CPUS:
            raise ValueError(f"must be one of {', '.join(map(str, ALLOWED_CPUS))}")
        return value

    # Cross-field checks are field validators on the later field (fields validate in order,
    # `info.data` holds the earlier ones that passed), so a bad SUPABASE_URL never hides them.

    @field_validator("sandbox_max_cpus")
    @classmethod
    def _cpus_within_max(cls, value: int, info: ValidationInfo) -> int:
        cpus = info.data.get("sandbox_cpus")
        if cpus is not None and cpus > value:
            raise ValueError("must not be less than SANDBOX_CPUS")
        return value

    @field_validator("sandbox_max_memory_mb")
    @classmethod
    def _memory_within_max(cls, value: int, info: ValidationInfo) -> int:
        memory, cpus = info.data.get("sandbox_memory_mb"), info.data.get("sandbox_cpus")
        kind = info.data.get("sandbox_cpu_kind")
        if memory is None or cpus is None or kind is None:
            return value  # their own errors are reported
        per_cpu = memory_per_cpu_mb(kind)
        if memory > min(value, per_cpu * cpus):
            raise ValueError(
                f"SANDBOX_MEMORY_MB ({memory}) must not exceed SANDBOX_MAX_MEMORY_MB nor "
                f"{per_cpu} MB per {kind} CPU"
            )
        return value

    @field_validator("sandbox_idle_warning_s")
    @classmethod
    def _warning_before_timeout(cls, value: int, info: ValidationInfo) -> int:
        timeout = info.data.get("sandbox_idle_timeout_s")
        if value and timeout is not None and value >= timeout:
            raise ValueError("must be shorter than SANDBOX_IDLE_TIMEOUT_S")
        return value

    @field_validator("sandbox_smoke_command")
    @classmethod
    def _parsable_command(cls, value: str) -> str:
        try:
            shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot be parsed as a command line: {exc}") from None
        return value

    @property
    def http_port(self) -> int | None:
        """The port for health and metrics: LISTENER_HTTP_PORT, else PORT."""
        return self.listener_http_port or self.port

    @property
    def allowed_regions(self) -> frozenset[str]:
        """Regions a row may ask for: the configured list plus the default region."""
        extra = {r.strip() for r in self.sandbox_allowed_regions.split(",") if r.strip()}
        return frozenset(extra | {self.sandbox_region})

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from a mapping; raise one ConfigError naming every bad variable."""
        values = {k.lower(): v for k, v in env.items()}
        problems = _sandbox_app_problems(env)
        if values.get("sandbox_app_name"):
            values["fly_app_name"] = values["sandbox_app_name"]
        try:
            settings = cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(problems + [_describe(err) for err in exc.errors()]) from None
        if problems:
            raise ConfigError(problems)
        return settings


def _sandbox_app_problems(env: Mapping[str, str]) -> list[str]:
    """On Fly, FLY_APP_NAME is the listener's own app, whose secrets every machine in it gets:
    sandboxes must go to another app, named by SANDBOX_APP_NAME."""
    if not env.get("FLY_MACHINE_ID"):
        return []
    sandbox_app = env.get("SANDBOX_APP_NAME", "")
    if not sandbox_app:
        return [
            "SANDBOX_APP_NAME: required on Fly (FLY_APP_NAME there is this listener's own app); "
            "set it to the app that holds the sandbox machines"
        ]
    if sandbox_app == env.get("FLY_APP_NAME"):
        return [
            "SANDBOX_APP_NAME: must not be the listener's own app: its machines would receive "
            "the listener's secrets"
        ]
    return []


def _describe(err: Mapping[str, object]) -> str:
    """One line per problem: the variable's name and what is wrong, never its value."""
    loc = err.get("loc") or ("settings",)
    name = str(loc[0]).upper() if isinstance(loc, tuple) else str(loc).upper()
    if err.get("type") == "missing":
        return f"{name}: required but not set"
    message = str(err.get("msg")).removeprefix("Value error, ")
    return f"{name}: {message}"
