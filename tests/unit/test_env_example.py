""".env.example against Settings: every field with its default and description, nothing else.

Regenerate the file after changing Settings: `python -m tests.unit.test_env_example > .env.example`.
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from dotenv import dotenv_values
from pydantic.fields import FieldInfo

from listener.config import Settings

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"
REGENERATE = "python -m tests.unit.test_env_example > .env.example"
REQUIRED_MARK = " (required)"
SECTIONS = {
    "supabase": "Supabase",
    "fly": "Fly Machines API",
    "sandbox": "Sandbox machines",
    "listener": "Listener tunables",
}
OTHER_SECTION = "Platform and logs"
HEADER = f"""\
# sandbox-listener settings: every variable listener.config.Settings reads, with its default.
# Copy to .env and fill in the required values; a line left commented keeps the default.
# tests/unit/test_env_example.py checks this file against Settings. To regenerate:
#   {REGENERATE}
"""
FILLED = {
    "SUPABASE_URL": "https://abc.supabase.co",
    "SUPABASE_SERVICE_ROLE_KEY": "service-role-key",
    "FLY_API_TOKEN": "fly-token",
    "FLY_APP_NAME": "sandboxes",
}
_ASSIGNMENT = re.compile(r"^(?P<commented>#\s?)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def describe(field: FieldInfo) -> str:
    """The comment above a variable: the field's description, or its choices if it has none."""
    text = field.description
    if text is None:
        choices = typing.get_args(field.annotation)
        text = "One of: " + ", ".join(map(str, choices)) if choices else "No description"
    return text + (REQUIRED_MARK if field.is_required() else "")


def render_value(default: object) -> str:
    """A default as an env value: empty for None, lower-case booleans, floats without `.0`."""
    if default is None:
        return ""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float):
        return format(default, "g")
    return str(default)


def render_env_example() -> str:
    """The .env.example text for the current Settings model."""
    lines = [HEADER.rstrip("\n")]
    section = None
    for name, field in Settings.model_fields.items():
        title = SECTIONS.get(name.split("_", 1)[0], OTHER_SECTION)
        if title != section:
            section = title
            lines += ["", f"## {title}"]
        lines += ["", f"# {describe(field)}"]
        if field.is_required():
            lines.append(f"{name.upper()}=")
        else:
            lines.append(f"# {name.upper()}={render_value(field.default)}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Entry:
    """One variable in the file: its value, whether it is set or commented out, its comment."""

    name: str
    value: str
    active: bool
    comment: str


def parse(text: str) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    comment = ""
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            name = match["name"]
            assert name not in entries, f"{name} is listed twice"
            entries[name] = Entry(name, match["value"], not match["commented"], comment)
            comment = ""
        elif line.startswith("# "):
            comment = line[2:]
        else:
            comment = ""
    return entries


@pytest.fixture(scope="module")
def entries() -> dict[str, Entry]:
    return parse(ENV_EXAMPLE.read_text())


def entry_for(name: str, entries: dict[str, Entry]) -> Entry:
    entry = entries.get(name.upper())
    assert entry is not None, f"{name.upper()} is missing from .env.example"
    return entry


def test_env_example_is_what_settings_generate() -> None:
    actual = ENV_EXAMPLE.read_text()
    expected = render_env_example()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                actual.splitlines(keepends=True),
                expected.splitlines(keepends=True),
                fromfile=".env.example",
                tofile="generated from Settings",
            )
        )
        pytest.fail(f".env.example is out of date; regenerate with `{REGENERATE}`:\n{diff}")


def test_env_example_lists_every_setting_and_nothing_else(entries: dict[str, Entry]) -> None:
    fields = {name.upper() for name in Settings.model_fields}
    assert sorted(fields - entries.keys()) == [], "missing from .env.example"
    assert sorted(entries.keys() - fields) == [], "in .env.example but not a Settings field"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_each_variable_carries_its_description(name: str, entries: dict[str, Entry]) -> None:
    field = Settings.model_fields[name]
    entry = entry_for(name, entries)
    if field.description is not None:
        assert entry.comment.removesuffix(REQUIRED_MARK) == field.description
    else:
        assert entry.comment, f"{entry.name} has no comment"
    assert entry.comment.endswith(REQUIRED_MARK) == field.is_required()


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_each_variable_shows_its_default(name: str, entries: dict[str, Entry]) -> None:
    field = Settings.model_fields[name]
    entry = entry_for(name, entries)
    if field.is_required():
        assert entry.active and entry.value == "", f"{entry.name} is required: `{entry.name}=`"
        return
    assert not entry.active, f"{entry.name} has a default; list it commented out"
    if entry.value == "":
        assert field.default in (None, ""), f"{entry.name}: empty, but the default is set"
    else:
        parsed = Settings.from_env({**FILLED, entry.name: entry.value})
        assert getattr(parsed, name) == field.default


def test_copy_with_required_values_filled_in_gives_the_defaults() -> None:
    listed = {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE).items()}
    assert listed == dict.fromkeys(FILLED, "")
    assert Settings.from_env({**listed, **FILLED}) == Settings.from_env(FILLED)


def test_parse_reads_set_and_commented_variables_with_their_comments() -> None:
    text = "# Header\n\n# First\nA_B=\n# Second\n# C=1.5\n\nD=x\n"
    assert parse(text) == {
        "A_B": Entry("A_B", "", True, "First"),
        "C": Entry("C", "1.5", False, "Second"),
        "D": Entry("D", "x", True, ""),
    }


if __name__ == "__main__":
    sys.stdout.write(render_env_example())
