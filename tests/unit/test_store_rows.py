"""Rows as the listener reads them: every value that can arrive is parsed or refused by name."""

from __future__ import annotations

from typing import Any

import pytest

from listener.errors import StoreError
from listener.store import session_from_row

ROW: dict[str, Any] = {
    "id": "7f1c2a3e-0000-4000-8000-000000000001",
    "sandbox_incarnation": "7f1c2a3e-0000-4000-8000-000000000002",
    "user_id": "7f1c2a3e-0000-4000-8000-000000000003",
    "status": "active",
    "sandbox_state": "requested",
    "sandbox_epoch": 1,
    "created_at": "2026-12-08T01:00:00+00:00",
    "last_activity_at": "2026-12-08T01:00:00+00:00",
}


def test_a_good_row_parses() -> None:
    session = session_from_row(ROW)
    assert (session.incarnation, session.epoch) == (ROW["sandbox_incarnation"], 1)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("last_activity_at", "infinity"),
        ("created_at", "-infinity"),
        ("created_at", "10000-01-01T00:00:00+00:00"),
        ("sandbox_ready_at", "0044-03-15T00:00:00+00:00 BC"),
        ("sandbox_deadline_at", 12345),
        ("status", "paused"),
        ("sandbox_state", "x" * 10_000),
        ("sandbox_epoch", "one"),
        ("sandbox_incarnation", None),
    ],
)
def test_an_unusable_value_is_a_store_error_that_names_it_briefly(column: str, value: Any) -> None:
    row = {**ROW, column: value}
    if value is None:
        del row[column]
    with pytest.raises(StoreError) as info:
        session_from_row(row)
    assert "unreadable coding_sessions row" in str(info.value)
    assert len(str(info.value)) < 300
