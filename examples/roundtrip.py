"""Sign a user JWT, insert a session as that user, and receive the change as service_role.

Uses only the `supabase` client, PyJWT and the env file written by
`sandbox-listener local up --env-file FILE` (or any Supabase project's values):

    python examples/roundtrip.py FILE
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import jwt
from realtime.types import RealtimePostgresChangesListenEvent
from supabase import AsyncClientOptions, acreate_client


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


async def main(env_file: Path) -> int:
    env = read_env(env_file)
    url, secret = env["SUPABASE_URL"], env["SUPABASE_JWT_SECRET"]

    # 1. the service role subscribes to coding_sessions changes
    service = await acreate_client(url, env["SUPABASE_SERVICE_ROLE_KEY"])
    live, received = asyncio.Event(), asyncio.Queue[dict]()
    channel = service.channel("roundtrip")
    channel.on_postgres_changes(
        RealtimePostgresChangesListenEvent.Insert,
        schema="public",
        table="coding_sessions",
        callback=received.put_nowait,
    )
    channel.on_system(lambda p: live.set() if p.extension == "postgres_changes" else None)
    await channel.subscribe()
    await asyncio.wait_for(live.wait(), timeout=10)  # "Subscribed to PostgreSQL"

    # 2. a user JWT signed with the project's secret, for the test user `local up` created
    #    (a session's user_id must be a row of auth.users)
    user_id = env["LOCAL_USER_ID"]
    now = int(time.time())
    token = jwt.encode(
        {
            "sub": user_id,
            "role": "authenticated",
            "aud": "authenticated",
            "iat": now,
            "exp": now + 600,
        },
        secret,
        algorithm="HS256",
    )

    # 3. the user inserts a session through REST, under RLS
    user = await acreate_client(
        url,
        env["SUPABASE_ANON_KEY"],
        options=AsyncClientOptions(headers={"Authorization": f"Bearer {token}"}),
    )
    inserted = await user.table("coding_sessions").insert({}).execute()
    session_id = inserted.data[0]["id"]
    print(f"inserted session {session_id} as user {user_id}")

    # 4. the service role receives the INSERT
    change = await asyncio.wait_for(received.get(), timeout=10)
    record = change["data"]["record"]
    assert record["id"] == session_id, record
    print(
        f"service_role received {RealtimePostgresChangesListenEvent(change['data']['type']).value}"
        f" of {record['id']} "
        f"(sandbox_state={record['sandbox_state']})"
    )
    await service.realtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]))))
