"""Prometheus metrics: one registry per process, named and labelled once, here."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from listener.models import SandboxState

PROVISION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """The listener's counters, gauges and histograms in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.provisioning_seconds = Histogram(
            "sandbox_provisioning_seconds",
            "Time from claim to ready (create, wait, smoke)",
            buckets=PROVISION_BUCKETS_S,
            registry=r,
        )
        self.sessions_failed = Counter(
            "sandbox_sessions_failed_total",
            "Sessions marked failed for good",
            ["stage"],
            registry=r,
        )
        self.sandboxes_destroyed = Counter(
            "sandbox_destroyed_total", "Sandboxes destroyed, by reason", ["reason"], registry=r
        )
        self.claims_lost = Counter(
            "sandbox_claims_lost_total", "Claims taken over by another epoch", registry=r
        )
        self.fly_calls = Counter(
            "fly_api_calls_total", "Fly Machines API calls", ["operation", "status"], registry=r
        )
        self.fly_retries = Counter(
            "fly_api_retries_total", "Fly calls retried", ["operation"], registry=r
        )
        self.intake = Counter(
            "sandbox_intake_total",
            "Sessions taken up, by source (realtime event or catch-up scan)",
            ["source"],
            registry=r,
        )
        self.missed_events = Counter(
            "sandbox_missed_events_total",
            "Sessions the catch-up scan found before any Realtime event announced them",
            registry=r,
        )
        self.queue_depth = Gauge(
            "listener_queue_depth", "Sessions waiting for a worker", registry=r
        )
        self.in_flight = Gauge("listener_in_flight", "Sessions being handled now", registry=r)
        self.sweeps = Counter("sweeper_runs_total", "Sweeps run", ["outcome"], registry=r)
        self.sweep_actions = Counter(
            "sweeper_actions_total", "Sweeper actions, by kind", ["action"], registry=r
        )
        self.orphans_destroyed = Counter(
            "sandbox_orphans_destroyed_total", "Orphan machines destroyed", registry=r
        )
        self.sessions_by_state = Gauge(
            "sandbox_sessions", "Sessions by sandbox state", ["state"], registry=r
        )
        self.commands = Counter(
            "sandbox_commands_total", "Commands finished, by status", ["status"], registry=r
        )
        self.realtime_subscribed = Gauge(
            "realtime_subscribed", "1 while the Realtime subscription is confirmed", registry=r
        )

    def provisioned(self, seconds: float) -> None:
        """A sandbox became ready after `seconds`."""
        self.provisioning_seconds.observe(seconds)

    def session_failed(self, stage: str) -> None:
        """A session was failed for good at `stage`."""
        self.sessions_failed.labels(stage=stage).inc()

    def destroyed(self, reason: str) -> None:
        """A sandbox was destroyed for `reason`."""
        self.sandboxes_destroyed.labels(reason=reason).inc()

    def set_sessions_by_state(self, counts: Mapping[str, int]) -> None:
        """Sessions per sandbox state as just counted; a state missing from `counts` has none."""
        for state in {*(s.value for s in SandboxState), *counts}:
            self.sessions_by_state.labels(state=state).set(counts.get(state, 0))
