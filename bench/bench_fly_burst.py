"""A burst of creates through FlyClient against the emulator enforcing a rate limit.

Run: python bench/bench_fly_burst.py [-n 500] [--rate 50] [--burst 3]. Prints JSON.

The emulator enforces `rate`/`burst` per app for create (as Fly does, at 1/s burst 3; a faster
rate keeps the run short, the pacing logic is the same). The client's limiter is configured
with the same limit. Target (issue 3): all N creates finish within 1.1x of the minimum the
limit allows, (N - burst) / rate, with zero 429s reaching the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

import httpx
import structlog

from listener.errors import FlyRateLimitedError
from listener.fly import FlyClient, fly_rate_limiter, machine_config
from listener.local.fly_emulator import EmulatorOptions, FlyEmulator
from listener.ratelimit import Rate

TOKEN = "bench-token"


async def burst(n: int, rate: float, burst_size: int) -> dict[str, object]:
    limits = {"action_rate_per_s": rate, "action_burst": burst_size}
    emulator = FlyEmulator(EmulatorOptions(token=TOKEN, **limits))
    await emulator.start()
    try:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100)) as http:
            fly = FlyClient(
                http,
                base_url=emulator.url,
                app_name=emulator.options.app_name,
                token=TOKEN,
                limiter=fly_rate_limiter(Rate(rate, burst_size), Rate(rate * 5, 10)),
            )
            config = machine_config("img", metadata={"managed_by": "bench"})
            started = time.monotonic()
            results = await asyncio.gather(
                *(fly.create_machine(config, region=None) for _ in range(n)),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
    finally:
        await emulator.stop()
    minimum = max(n - burst_size, 0) / rate
    rate_limited = sum(isinstance(r, FlyRateLimitedError) for r in results)
    failed = sum(isinstance(r, BaseException) for r in results)
    return {
        "creates": n,
        "rate_per_s": rate,
        "burst": burst_size,
        "seconds": round(elapsed, 3),
        "minimum_seconds": round(minimum, 3),
        "ratio_to_minimum": round(elapsed / minimum, 3) if minimum else None,
        "target_ratio": 1.1,
        "429_at_emulator": emulator.calls("create", status=429),
        "429_reaching_caller": rate_limited,
        "other_failures": failed - rate_limited,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="creates (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=50.0, help="per second (default: 50)")
    parser.add_argument("--burst", type=int, default=3, help="burst (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(json.dumps(asyncio.run(burst(args.n, args.rate, args.burst)), indent=2))


if __name__ == "__main__":
    main()
