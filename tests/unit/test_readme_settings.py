"""The README's configuration table names every setting, and only real ones."""

from __future__ import annotations

import re
from pathlib import Path

from listener.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def documented() -> set[str]:
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", README.read_text(), re.MULTILINE))


def test_every_setting_is_in_the_readme_table() -> None:
    missing = {name.upper() for name in Settings.model_fields} - documented()
    assert not missing, f"add these to README.md's configuration table: {sorted(missing)}"


def test_the_readme_table_names_no_unknown_setting() -> None:
    unknown = documented() - {name.upper() for name in Settings.model_fields}
    assert not unknown, f"README.md documents settings that do not exist: {sorted(unknown)}"
