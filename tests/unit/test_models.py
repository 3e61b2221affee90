"""Domain values read from Fly's strings: a machine's claim epoch."""

from __future__ import annotations

import pytest

from listener.models import MAX_EPOCH, Machine, MachineState


def machine(**metadata: str) -> Machine:
    return Machine("m1", MachineState.STARTED, "iad", "i1", metadata=metadata)


@pytest.mark.parametrize(
    ("raw", "epoch"),
    [
        ("0", 0),
        ("3", 3),
        ("007", 7),
        (str(MAX_EPOCH), MAX_EPOCH),
        (str(MAX_EPOCH + 1), None),
        ("99999999999999999999", None),
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1.0", None),
        ("", None),
        ("²", None),  # str.isdigit says yes, int() says no
        ("١٢", None),  # Arabic-Indic digits: int() would read 12
    ],
)
def test_epoch_is_a_bigint_in_ascii_digits_or_none(raw: str, epoch: int | None) -> None:
    assert machine(epoch=raw).epoch == epoch


def test_a_machine_without_an_epoch_has_none() -> None:
    assert machine(session_id="s1").epoch is None
