"""The `sandbox-listener` command line: parse arguments, call the right part, print the outcome."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from listener import __version__

DEFAULT_API_PORT = 54321  # what `supabase start` uses
DEFAULT_FLY_PORT = 54329

EPILOG = """\
examples:
  sandbox-listener dev                      local stack + listener; shows sessions as they change
  sandbox-listener dev --demo               one session end to end, then exit
  sandbox-listener local up --env-file .env stack only; writes URLs and keys to .env
  sandbox-listener run                      production worker (settings from the environment)

Every setting is an environment variable; see .env.example or `sandbox-listener doctor`.
"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree, with help text for every command and option."""
    parser = argparse.ArgumentParser(
        prog="sandbox-listener",
        description="Turns Supabase coding_sessions rows into Fly.io sandbox Machines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "run",
        help="run the listener (production worker; settings from the environment)",
        description="Subscribe to coding_sessions, provision and reap sandboxes until SIGTERM. "
        "Exits 0 after a graceful drain, 2 on bad configuration, 1 if a loop crashes.",
    )

    dev = commands.add_parser(
        "dev",
        help="local stack + listener in one process; shows session transitions live",
        description="Start the embedded local stack and a listener against it, print how to "
        "create a session, and show every session's transitions as they happen.",
    )
    dev.add_argument(
        "--demo",
        action="store_true",
        help="create one session as a test user, show it become ready then destroyed, and exit",
    )
    _add_stack_options(dev)

    status = commands.add_parser(
        "status", help="sessions (state, machine, age, idle, expires in) and Fly drift"
    )
    _add_env_file(status)

    sweep = commands.add_parser("sweep", help="run one catch-up scan and one reconcile")
    sweep.add_argument("--once", action="store_true", required=True, help="run once and exit")
    sweep.add_argument(
        "--dry-run", action="store_true", help="print what it would do; act on nothing"
    )
    _add_env_file(sweep)

    run_in = commands.add_parser(
        "exec",
        help="run a command in a session's sandbox through the queue; exit with its code",
        description="Queue CMD for SESSION (as the session's owner), wait for a listener to run "
        "it, print its stdout and stderr, and exit with its exit code (124 if it timed out, "
        "125 if it was rejected or could not run).",
    )
    run_in.add_argument("session", help="coding_sessions.id")
    run_in.add_argument("argv", nargs="+", metavar="CMD", help="the command and its arguments")
    run_in.add_argument("--timeout-s", type=int, default=60, help="default: %(default)s")
    run_in.add_argument(
        "--stdin", action="store_true", help="pass this process's standard input to the command"
    )
    _add_env_file(run_in)

    doctor = commands.add_parser(
        "doctor",
        help="check settings, Supabase (schema, publication, Realtime) and the Fly token and app",
        description="Check the configuration and every service it names; print one PASS, WARN, "
        "FAIL or SKIP line per check (with a hint on WARN and FAIL). Exits 0 when nothing "
        "failed, 1 when a check failed, 2 on bad configuration. Never prints a secret.",
    )
    _add_env_file(doctor)

    destroy = commands.add_parser("destroy", help="destroy one session's sandbox now")
    destroy.add_argument("session", help="coding_sessions.id")
    _add_env_file(destroy)

    local = commands.add_parser("local", help="the embedded local stack (no cloud, no Docker)")
    local_commands = local.add_subparsers(dest="local_command", metavar="ACTION", required=True)
    up = local_commands.add_parser(
        "up",
        help="start Postgres, REST, Realtime and the Fly emulator on 127.0.0.1 until Ctrl-C",
        description="Start the local stack in the foreground and print its URLs and keys.",
    )
    _add_stack_options(up)

    token = local_commands.add_parser(
        "token",
        help="print a user JWT for the running stack (creates the user if needed)",
        description="Sign an access token for a test user with the stack's JWT secret. Reads "
        "SUPABASE_JWT_SECRET and SUPABASE_DB_URL from --env-file or the environment.",
    )
    token.add_argument("--env-file", type=Path, help="env file written by `local up --env-file`")
    token.add_argument("--email", default="dev@example.com", help="the user (default: %(default)s)")
    token.add_argument("--ttl-s", type=int, default=86400, help="lifetime (default: %(default)s)")

    fly = local_commands.add_parser(
        "fly",
        help="run only the Fly Machines emulator",
        description="Serve the Fly Machines API emulator on 127.0.0.1 until Ctrl-C.",
    )
    fly.add_argument(
        "--port", type=int, default=DEFAULT_FLY_PORT, help="port (default: %(default)s)"
    )
    fly.add_argument("--token", default=None, help="bearer token it accepts (default: random)")
    fly.add_argument("--app", default="sandbox-local", help="app name (default: %(default)s)")
    return parser


def _add_stack_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--env-file", type=Path, help="write the URLs and keys here once ready")
    cmd.add_argument(
        "--data-dir",
        type=Path,
        help="keep the database here between runs (default: a temporary dir removed on exit)",
    )
    cmd.add_argument(
        "--port", type=int, default=DEFAULT_API_PORT, help="API port (default: %(default)s)"
    )
    cmd.add_argument("--db-port", type=int, default=None, help="Postgres port (default: any free)")
    cmd.add_argument(
        "--fly-port", type=int, default=DEFAULT_FLY_PORT, help="Fly port (default: %(default)s)"
    )


def _add_env_file(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--env-file", type=Path, help="read settings from this file too (e.g. from local up)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sandbox-listener` and `python -m listener`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from listener.app import main as run_main

        return run_main()
    if args.command == "dev":
        return asyncio.run(_dev(args))
    if args.command in {"status", "sweep", "destroy", "exec", "doctor"}:
        return _operator(args)
    if args.command == "local":
        if args.local_command == "up":
            return asyncio.run(_local_up(args))
        if args.local_command == "token":
            return _local_token(args)
        if args.local_command == "fly":
            return asyncio.run(_local_fly(args))
    raise AssertionError(f"unhandled command {args.command}")  # argparse guarantees a command


async def _dev(args: argparse.Namespace) -> int:
    from listener.app import run_until_signalled
    from listener.dev import dev
    from listener.local.stack import StackError

    result = 0

    async def body(stop: asyncio.Event) -> None:
        nonlocal result
        result = await dev(
            demo_mode=args.demo,
            api_port=args.port,
            fly_port=args.fly_port,
            data_dir=args.data_dir,
            env_file=args.env_file,
            stop=stop,
        )

    try:
        crashed = await run_until_signalled(body)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return crashed or result


def _operator(args: argparse.Namespace) -> int:
    from listener import commands
    from listener.app import load_settings
    from listener.logs import configure_logging

    env = dict(os.environ)
    if args.env_file:
        env = {**_read_env_file(args.env_file), **env}
    if args.command == "doctor":  # reports bad settings as checks, so it reads them itself
        from listener.doctor import doctor

        configure_logging("error", env.get("LOG_FORMAT", "auto").lower())
        return asyncio.run(doctor(env))
    settings = load_settings(env)
    if settings is None:
        return 2
    configure_logging("warning", settings.log_format)
    if args.command == "status":
        return asyncio.run(commands.status(settings))
    if args.command == "sweep":
        return asyncio.run(commands.sweep(settings, dry_run=args.dry_run))
    if args.command == "exec":
        stdin = sys.stdin.read() if args.stdin else None
        return asyncio.run(
            commands.exec_command(
                settings, args.session, args.argv, timeout_s=args.timeout_s, stdin=stdin
            )
        )
    return asyncio.run(commands.destroy(settings, args.session))


async def _local_up(args: argparse.Namespace) -> int:
    from listener.local import keys
    from listener.local.stack import DEV_USER_EMAIL, LocalStack, StackError, create_user
    from listener.logs import configure_logging

    configure_logging("warning", "console")
    started = time.monotonic()
    stack = LocalStack(
        data_dir=args.data_dir, api_port=args.port, db_port=args.db_port, fly_port=args.fly_port
    )
    try:
        info = await stack.__aenter__()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        user_id = create_user(info.db_url, DEV_USER_EMAIL)
        user_jwt = keys.user_token(info.jwt_secret, user_id, DEV_USER_EMAIL, ttl_s=86400)
        elapsed = time.monotonic() - started
        _print_stack(info.env(), user_jwt, elapsed)
        if args.env_file:
            test_user = {
                "LOCAL_USER_ID": str(user_id),
                "LOCAL_USER_EMAIL": DEV_USER_EMAIL,
                "LOCAL_USER_JWT": user_jwt,
            }
            info.write_env_file(args.env_file, extra=test_user)
            print(f"Wrote {args.env_file}.")
        print("Press Ctrl-C to stop.", flush=True)
        await _wait_for_signal()
        print("Stopping...", flush=True)
    finally:
        await stack.stop()
    return 0


def _print_stack(env: dict[str, str], user_jwt: str, elapsed_s: float) -> None:
    url = env["SUPABASE_URL"]
    rows = [
        ("API URL", url),
        ("REST URL", f"{url}/rest/v1"),
        ("Realtime URL", url.replace("http", "ws", 1) + "/realtime/v1"),
        ("DB URL", env["SUPABASE_DB_URL"]),
        ("JWT secret", env["SUPABASE_JWT_SECRET"]),
        ("anon key", env["SUPABASE_ANON_KEY"]),
        ("service_role key", env["SUPABASE_SERVICE_ROLE_KEY"]),
        ("Fly API URL", env["FLY_API_HOSTNAME"]),
        ("Fly app name", env["FLY_APP_NAME"]),
        ("Fly API token", env["FLY_API_TOKEN"]),
        ("user JWT (dev@example.com, 24 h)", user_jwt),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"Local stack started in {elapsed_s:.1f} s.\n")
    for name, value in rows:
        print(f"{name:>{width}}: {value}")
    print()


def _local_token(args: argparse.Namespace) -> int:
    from listener.local import keys
    from listener.local.stack import create_user

    env = dict(os.environ)
    if args.env_file:
        env.update(_read_env_file(args.env_file))
    missing = [k for k in ("SUPABASE_JWT_SECRET", "SUPABASE_DB_URL") if not env.get(k)]
    if missing:
        print(f"error: {', '.join(missing)} not set; pass --env-file", file=sys.stderr)
        return 2
    user_id = create_user(env["SUPABASE_DB_URL"], args.email)
    print(keys.user_token(env["SUPABASE_JWT_SECRET"], user_id, args.email, ttl_s=args.ttl_s))
    return 0


async def _local_fly(args: argparse.Namespace) -> int:
    from listener.local import keys
    from listener.local.fly_emulator import EmulatorOptions, FlyEmulator

    token = args.token or keys.new_secret()
    emulator = FlyEmulator(EmulatorOptions(token=token, app_name=args.app))
    await emulator.start(port=args.port)
    try:
        print(f"FLY_API_HOSTNAME={emulator.url}\nFLY_APP_NAME={args.app}\nFLY_API_TOKEN={token}")
        print("Press Ctrl-C to stop.", flush=True)
        await _wait_for_signal()
    finally:
        await emulator.stop()
    return 0


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored."""
    pairs: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


async def _wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM; the handlers only set an event."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
