"""How the emulated machines run commands: in their own directory, with a container's small
environment and, when the emulator runs as root, as an unprivileged system user.

A command stands in for one run inside a Fly VM, yet here it is a host process. As root it
runs as MACHINE_USER, who cannot read the emulator's memory or /proc/<pid>/environ (another
uid), nor files only root may read; it can read what any local user can. Not as root, there is
no one to drop to: commands run as the current user and can read what that user can, the
processes' environments included; only their own environment stays the machine's.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(component="fly_emulator")

MACHINE_USER = "fly-machine"
FALLBACK_USER = "nobody"  # where no system user can be made (no useradd)
USERADD = [
    "useradd",
    "--system",
    "--user-group",
    "--no-create-home",
    "--home-dir",
    "/nonexistent",
    "--shell",
    "/usr/sbin/nologin",
]


@dataclass(frozen=True, slots=True)
class MachineUser:
    """The account machine commands run as."""

    name: str
    uid: int
    gid: int


def machine_user() -> MachineUser | None:
    """As root, MACHINE_USER (created if missing); otherwise None: the current user runs them."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(MACHINE_USER)
    except KeyError:
        entry = _create_system_user(MACHINE_USER)
    return MachineUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_system_user(name: str) -> pwd.struct_passwd:
    try:
        subprocess.run([*USERADD, name], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        try:
            return pwd.getpwnam(name)  # another process made it meanwhile
        except KeyError:
            log.warning("machine_user_fallen_back", user=FALLBACK_USER, error=str(exc))
            return pwd.getpwnam(FALLBACK_USER)
    log.info("machine_user_created", user=name)
    return pwd.getpwnam(name)


def machine_environment(
    config_env: Mapping[str, str], home: Path, user: MachineUser | None
) -> dict[str, str]:
    """A command's whole environment: PATH (the host's tools stand in for the image's), the
    machine config's env and HOME in the machine's directory; nothing else of the host's."""
    return {"PATH": _path(user), **config_env, "HOME": str(home)}


def _path(user: MachineUser | None) -> str:
    """The host's PATH; for the machine user only the directories anyone may search (an entry
    under /root would turn "command not found" into "permission denied")."""
    entries = os.environ.get("PATH", os.defpath).split(os.pathsep)
    if user is not None:
        entries = [entry for entry in entries if _searchable_by_anyone(entry)]
    return os.pathsep.join(entries)


def _searchable_by_anyone(directory: str) -> bool:
    path = Path(directory)
    try:
        return path.is_absolute() and all(
            p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents)
        )
    except OSError:
        return False


def open_root(root: Path, user: MachineUser | None) -> None:
    """Let the machine user pass through the root of the machines' directories (not list it)."""
    if user is not None:
        root.chmod(root.stat().st_mode | stat.S_IXOTH)


def fresh_directory(path: Path, user: MachineUser | None) -> None:
    """An empty directory only the machine user may use: a new machine, or a stopped one
    booting a clean rootfs."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    if user is not None:
        os.chown(path, user.uid, user.gid)


async def spawn(
    argv: Sequence[str],
    workdir: Path,
    env: Mapping[str, str],
    user: MachineUser | None,
    *,
    stdin: bool,
) -> asyncio.subprocess.Process:
    """Start argv in the machine's directory as its user, in its own process group (so a kill
    takes its children too), with pipes for stdout and stderr (and stdin if `stdin`)."""
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=workdir,
        env=dict(env),
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        user=None if user is None else user.uid,
        group=None if user is None else user.gid,
        extra_groups=None if user is None else [],
    )
