"""Listener memory while FlyClient.exec reads a huge answer: a 500 MB stdout, 64 KiB kept.

Run: python -m bench.bench_exec_output [--stdout-mb 500] [--limit-bytes 65536] [--repeats 3]
     [--whole-read] [--out FILE]   (about 20 s; --whole-read adds 10 s and needs 2.5 GB free)

A raw asyncio HTTP server on 127.0.0.1 (in this process) answers exec with one JSON object
whose stdout (build-log lines with JSON escapes: \\n, \\t, ANSI \\u001b, non-ASCII) it writes
64 KiB at a time, never holding it, with exit_code and exit_signal after it. A child process
makes a warm-up exec, takes its VmRSS as the baseline, resets VmHWM (/proc/self/clear_refs),
runs the big exec and reports VmHWM - baseline: the peak growth the call caused. Issue 10's
target is growth below 2x the output limit. For scale, the same answer is also drained by
httpx alone (read and dropped, nothing parsed: the floor of streaming it at all), exec'd at
1% of the size (growth should not depend on it) and, with `--whole-read`, read whole and
parsed with json.loads, as FlyClient did before it streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from listener.fly import EXEC_OUTPUT_LIMIT_BYTES, FlyClient, fly_rate_limiter
from listener.ratelimit import Rate

MB = 1_000_000
TARGET_GROWTH_FACTOR = 2  # RSS growth below 2x the output limit (issue 10 §3)
STDERR = "warning: bench"
EXIT_CODE, EXIT_SIGNAL = 3, 0
WARM_UP_BYTES = 100_000


def _block() -> bytes:
    """About 64 KiB of JSON string content, whole escape sequences only."""
    lines = []
    for n in range(600):
        line = f'\\u001b[32m{n:06d}\\u001b[0m\\tcompiling module café_{n} ✓ [ok] \\"done\\"\\n'
        lines.append(line.encode() + b"." * (100 - len(line.encode())))
    return b"".join(lines)


BLOCK = _block()


def answer_parts(stdout_bytes: int) -> tuple[bytes, int, bytes]:
    """(head, blocks, tail): the answer is head + BLOCK * blocks + tail."""
    head = b'{"stdout":"'
    tail = json.dumps({"stderr": STDERR, "exit_code": EXIT_CODE, "exit_signal": EXIT_SIGNAL})
    return head, max(1, stdout_bytes // len(BLOCK)), b'",' + tail[1:].encode()


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer exec requests on one connection; the size comes from argv[1]."""
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
            body = await reader.readexactly(int(fields.get(b"Content-Length", b"0")))
            size = int(json.loads(body)["command"][1])
            first, blocks, last = answer_parts(size)
            length = len(first) + blocks * len(BLOCK) + len(last)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {length}\r\n\r\n".encode()
                + first
            )
            for _ in range(blocks):
                writer.write(BLOCK)
                await writer.drain()
            writer.write(last)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class ExecServer:
    """The fake exec endpoint on its own loop in a background thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(_serve_one, "127.0.0.1", 0)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


# -- the child: the listener side --------------------------------------------------------------


def _memory_kb() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {
            key: int(value.split()[0])
            for key, _, value in (line.partition(":") for line in status)
            if key in {"VmRSS", "VmHWM"}
        }


def _reset_peak() -> None:
    """VmHWM := VmRSS (Linux's clear_refs), so the next peak is the call's own."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


async def _child(port: int, stdout_bytes: int, limit_bytes: int, mode: str) -> dict[str, Any]:
    huge = Rate(1e9, 10**9)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5)) as http:
        fly = FlyClient(
            http,
            app_name="bench",
            token="bench",
            base_url=f"http://127.0.0.1:{port}",
            limiter=fly_rate_limiter(huge, huge),
        )
        await fly.exec("m1", ["print", str(WARM_UP_BYTES)], timeout_s=60)  # imports, pool
        url = f"http://127.0.0.1:{port}/v1/apps/bench/machines/m1/exec"
        body = {"command": ["print", str(stdout_bytes)], "timeout": 600}
        gc.collect()
        baseline = _memory_kb()["VmRSS"]
        _reset_peak()
        started = time.perf_counter()
        exit_code, kept, cut = None, 0, False
        if mode == "whole":
            parsed = json.loads((await http.post(url, json=body)).content)
            exit_code, kept = parsed["exit_code"], len(parsed["stdout"])
        elif mode == "drain":
            async with http.stream("POST", url, json=body) as response:
                async for _ in response.aiter_bytes():
                    pass
        else:
            result = await fly.exec(
                "m1", body["command"], timeout_s=600, output_limit_bytes=limit_bytes
            )
            exit_code, kept, cut = result.exit_code, len(result.stdout), result.stdout_truncated
        elapsed_s = time.perf_counter() - started
        peak = _memory_kb()["VmHWM"]
    return {
        "baseline_rss_kb": baseline,
        "peak_rss_kb": peak,
        "peak_growth_kb": peak - baseline,
        "elapsed_s": round(elapsed_s, 3),
        "exit_code": exit_code,
        "stdout_kept_chars": kept,
        "stdout_truncated": cut,
    }


def measure(port: int, stdout_bytes: int, limit_bytes: int, mode: str = "exec") -> dict[str, Any]:
    """One read of an answer (`mode`: exec, drain or whole) in a fresh child; its figures."""
    args = [str(port), str(stdout_bytes), str(limit_bytes), "--mode", mode]
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_exec_output", "--child", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    head, blocks, tail = answer_parts(stdout_bytes)
    body_bytes = len(head) + blocks * len(BLOCK) + len(tail)
    return {
        "body_bytes": body_bytes,
        **figures,
        "throughput_mb_s": round(body_bytes / MB / figures["elapsed_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout-mb", type=float, default=500)
    parser.add_argument("--limit-bytes", type=int, default=EXEC_OUTPUT_LIMIT_BYTES)
    parser.add_argument("--repeats", type=int, default=3, help="the median exec is reported")
    parser.add_argument("--whole-read", action="store_true", help="also measure a whole read")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, type=int, metavar=("PORT", "BYTES", "LIMIT"))
    parser.add_argument("--mode", choices=["exec", "drain", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(*args.child, mode=args.mode))))
        return

    from bench.common import RESULTS_DIR, write_result  # not in the child: it stays lean

    stdout_bytes = int(args.stdout_mb * MB)
    target_kb = TARGET_GROWTH_FACTOR * args.limit_bytes / 1024
    server = ExecServer()
    try:
        runs = [measure(server.port, stdout_bytes, args.limit_bytes) for _ in range(args.repeats)]
        small = measure(server.port, stdout_bytes // 100, args.limit_bytes)
        drained = measure(server.port, stdout_bytes, args.limit_bytes, "drain")
        whole = measure(server.port, stdout_bytes, 0, "whole") if args.whole_read else None
    finally:
        server.close()
    streamed = sorted(runs, key=lambda run: run["peak_growth_kb"])[len(runs) // 2]
    result = {
        "benchmark": "exec-output",
        "settings": {
            "stdout_mb": args.stdout_mb,
            "output_limit_bytes": args.limit_bytes,
            "server": "raw asyncio HTTP/1.1 on 127.0.0.1, Content-Length, 64 KiB writes",
        },
        "streamed": streamed,
        "streamed_growth_kb_samples": [run["peak_growth_kb"] for run in runs],
        "streamed_throughput_mb_s_samples": [run["throughput_mb_s"] for run in runs],
        "streamed_at_1_percent_of_the_size": small,
        "httpx_drain_only": drained,
        "whole_read_json_loads": whole,
        "target_growth_kb": target_kb,
        "met": streamed["peak_growth_kb"] < target_kb
        and streamed["exit_code"] == EXIT_CODE
        and streamed["stdout_truncated"],
    }
    write_result(args.out or RESULTS_DIR / "exec-output.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
