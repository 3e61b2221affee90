-- The listener's atomic transitions, called over RPC with the service-role key. Every function
-- is SECURITY INVOKER (service_role bypasses RLS; nobody else may execute them) and returns the
-- session row AS IT NOW STANDS after the call, whether or not the change applied: zero rows means
-- no such session, and the caller compares sandbox_epoch / sandbox_state / sandbox_claimed_by to
-- learn whether it won. "CAS": a write applies only where id = p_id and sandbox_epoch = p_epoch
-- and the state precondition holds; otherwise nothing changes.
-- A caller holds a session's claim when the returned row has sandbox_claimed_by = its owner id
-- and a lease in the future; it then acts under the returned sandbox_epoch.

create function public.claim_session(
    p_id uuid, p_owner text, p_lease_s integer, p_force boolean default false
) returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
declare
    cur coding_sessions;
begin
    select * into cur from coding_sessions where id = p_id for update skip locked;
    if not found then
        -- Missing, or locked by a transaction changing it right now: answer with the row as last
        -- committed, so "no such session" (zero rows) stays distinct from "not claimed".
        return query select * from coding_sessions where id = p_id;
        return;
    end if;
    if cur.sandbox_state not in ('destroyed', 'failed')
        and (p_force or cur.sandbox_due_at <= now())
        and (cur.sandbox_lease_expires_at is null or cur.sandbox_lease_expires_at <= now()
             or cur.sandbox_claimed_by = p_owner)
    then
        return query
            update coding_sessions set
                sandbox_epoch = sandbox_epoch + 1,
                sandbox_claimed_by = p_owner,
                sandbox_lease_expires_at = now() + make_interval(secs => p_lease_s)
            where id = p_id
            returning *;
    else
        return next cur;
    end if;
end;
$$;

comment on function public.claim_session(uuid, text, integer, boolean) is
    'Claim one session (epoch + 1, lease) if it is due (or p_force), its lease is free, lapsed or '
    'already p_owner''s, and it is not destroyed/failed. A row locked by another transaction is '
    'skipped, not waited for: its last committed version is returned unclaimed.';

create function public.claim_sessions(p_owner text, p_lease_s integer, p_limit integer)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    -- Destroyed and failed rows have no due time, so the due index never holds them.
    return query
        with due as (
            select id from coding_sessions
            where sandbox_due_at <= now()
              and (sandbox_lease_expires_at is null or sandbox_lease_expires_at <= now())
            order by sandbox_due_at
            limit p_limit
            for update skip locked
        )
        update coding_sessions s set
            sandbox_epoch = s.sandbox_epoch + 1,
            sandbox_claimed_by = p_owner,
            sandbox_lease_expires_at = now() + make_interval(secs => p_lease_s)
        from due
        where s.id = due.id
        returning s.*;
end;
$$;

comment on function public.claim_sessions(text, integer, integer) is
    'Claim up to p_limit due sessions with a free or lapsed lease, most overdue first; returns the '
    'claimed rows. Concurrent callers get disjoint sets (SKIP LOCKED).';

create function public.sandbox_renew_lease(p_id uuid, p_epoch bigint, p_lease_s integer)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query
        update coding_sessions set
            sandbox_lease_expires_at = now() + make_interval(secs => p_lease_s)
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

comment on function public.sandbox_renew_lease(uuid, bigint, integer) is
    'CAS: extend the current claim''s lease to now() + p_lease_s.';

create function public.sandbox_release(p_id uuid, p_epoch bigint)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query
        update coding_sessions set
            sandbox_claimed_by = null,
            sandbox_lease_expires_at = null
        where id = p_id and sandbox_epoch = p_epoch
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

comment on function public.sandbox_release(uuid, bigint) is
    'CAS: hand the claim back (e.g. on shutdown) so another listener may take the row at once.';

create function public.sandbox_begin_provision(p_id uuid, p_epoch bigint, p_max_lifetime_s integer)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    -- In UPDATE ... SET, sandbox_state still reads the old value.
    return query
        update coding_sessions set
            sandbox_state = 'provisioning',
            sandbox_attempts = sandbox_attempts + case when sandbox_state = 'requested' then 1 else 0 end,
            sandbox_deadline_at = case
                when sandbox_state = 'requested' then now() + make_interval(secs => p_max_lifetime_s)
                else sandbox_deadline_at
            end,
            sandbox_error = null,
            sandbox_next_attempt_at = null
        where id = p_id and sandbox_epoch = p_epoch
          and sandbox_state in ('requested', 'provisioning')
          and status = 'active'
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

comment on function public.sandbox_begin_provision(uuid, bigint, integer) is
    'CAS on an active session in requested/provisioning: -> provisioning. From requested it counts '
    'an attempt and sets the machine''s hard deadline; resuming provisioning keeps both.';

create function public.sandbox_set_machine(
    p_id uuid, p_epoch bigint, p_machine_id text, p_region text
) returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query
        update coding_sessions set
            sandbox_id = p_machine_id,
            sandbox_region = p_region
        where id = p_id and sandbox_epoch = p_epoch and sandbox_state = 'provisioning'
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

comment on function public.sandbox_set_machine(uuid, bigint, text, text) is
    'CAS in provisioning: record the Fly Machine id and region as soon as they are known.';

create function public.sandbox_mark_ready(p_id uuid, p_epoch bigint, p_idle_timeout_s integer)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query
        update coding_sessions set
            sandbox_state = 'ready',
            sandbox_ready_at = now(),
            sandbox_idle_timeout_s = p_idle_timeout_s,
            sandbox_claimed_by = null,
            sandbox_lease_expires_at = null
        where id = p_id and sandbox_epoch = p_epoch
          and sandbox_state = 'provisioning' and sandbox_id is not null
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

comment on function public.sandbox_mark_ready(uuid, bigint, integer) is
    'CAS in provisioning with a machine: -> ready, releasing the claim; the trigger sets expires_at.';

create function public.sandbox_mark_failed(
    p_id uuid, p_epoch bigint, p_error text, p_retry_after_s integer default null
) returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
declare
    retry boolean := p_retry_after_s is not null;
begin
    -- A retry goes back to requested with no machine; the per-machine columns go with it.
    return query
        update coding_sessions set
            sandbox_state = case when retry then 'requested' else 'failed' end,
            sandbox_error = p_error,
            sandbox_next_attempt_at = case
                when retry then now() + make_interval(secs => p_retry_after_s)
            end,
            sandbox_id = case when retry then null else sandbox_id end,
            sandbox_region = case when retry then null else sandbox_region end,
            sandbox_ready_at = case when retry then null else sandbox_ready_at end,
            sandbox_deadline_at = case when retry then null else sandbox_deadline_at end,
            sandbox_idle_timeout_s = case when retry then null else sandbox_idle_timeout_s end,
            sandbox_claimed_by = null,
            sandbox_lease_expires_at = null
        where id = p_id and sandbox_epoch = p_epoch
          and sandbox_state in ('requested', 'provisioning', 'ready')
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

comment on function public.sandbox_mark_failed(uuid, bigint, text, integer) is
    'CAS in requested/provisioning/ready: record p_error and release the claim. With '
    'p_retry_after_s: back to requested (no machine), due again after that many seconds; '
    'without: -> failed for good.';

create function public.sandbox_begin_stop(p_id uuid, p_epoch bigint, p_reason text)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query
        update coding_sessions set
            sandbox_state = 'stopping',
            sandbox_stop_reason = p_reason
        where id = p_id and sandbox_epoch = p_epoch
          and sandbox_state in ('requested', 'provisioning', 'ready', 'stopping')
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

comment on function public.sandbox_begin_stop(uuid, bigint, text) is
    'CAS before destroyed/failed: -> stopping with the reason (ended, deleted, idle, max_age, lost, '
    'shutdown, operator); the claim is kept for the teardown.';

create function public.sandbox_mark_destroyed(p_id uuid, p_epoch bigint)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    -- The trigger clears sandbox_expires_at and sandbox_due_at for a destroyed row.
    return query
        update coding_sessions set
            sandbox_state = 'destroyed',
            sandbox_destroyed_at = now(),
            sandbox_claimed_by = null,
            sandbox_lease_expires_at = null
        where id = p_id and sandbox_epoch = p_epoch
          and sandbox_state in ('requested', 'provisioning', 'ready', 'stopping')
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

comment on function public.sandbox_mark_destroyed(uuid, bigint) is
    'CAS before destroyed/failed: -> destroyed, releasing the claim. The row needs no attention again.';

create function public.sandbox_record_event(
    p_session_id uuid, p_epoch bigint, p_event text, p_detail jsonb default '{}'::jsonb
) returns public.sandbox_events
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
declare
    recorded sandbox_events;
begin
    insert into sandbox_events (session_id, epoch, event, detail)
    values (p_session_id, p_epoch, p_event, coalesce(p_detail, '{}'::jsonb))
    returning * into recorded;
    return recorded;
end;
$$;

comment on function public.sandbox_record_event(uuid, bigint, text, jsonb) is
    'Append one event to the audit; returns the inserted row.';

create function public.sandbox_sessions_by_ids(p_ids uuid[])
    returns setof public.coding_sessions
    language plpgsql
    stable
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query select * from coding_sessions where id = any(p_ids);
end;
$$;

comment on function public.sandbox_sessions_by_ids(uuid[]) is
    'The sessions with these ids (for the reconcile against the Fly inventory); missing ids are absent.';

create function public.sandbox_live_sessions(p_limit integer default 10000)
    returns setof public.coding_sessions
    language plpgsql
    stable
    security invoker
    set search_path = public, pg_temp
as $$
begin
    -- Same predicate as coding_sessions_live_idx, so the partial index serves it.
    return query
        select * from coding_sessions
        where sandbox_state in ('provisioning', 'ready', 'stopping')
        order by id
        limit p_limit;
end;
$$;

comment on function public.sandbox_live_sessions(integer) is
    'Sessions whose machine may exist (provisioning, ready, stopping), by id, at most p_limit.';

create function public.take_listener_lease(p_name text, p_owner text, p_ttl_s integer)
    returns boolean
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    insert into listener_leases as held (name, owner, expires_at)
    values (p_name, p_owner, now() + make_interval(secs => p_ttl_s))
    on conflict (name) do update set
        owner = excluded.owner,
        expires_at = excluded.expires_at
    where held.owner = excluded.owner or held.expires_at <= now();
    return found;
end;
$$;

comment on function public.take_listener_lease(text, text, integer) is
    'Take the named lease if free or lapsed, or renew it if p_owner holds it; true if p_owner '
    'holds it afterwards.';

create function public.release_listener_lease(p_name text, p_owner text)
    returns void
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    delete from listener_leases where name = p_name and owner = p_owner;
end;
$$;

comment on function public.release_listener_lease(text, text) is
    'Give up the named lease if p_owner holds it; otherwise nothing changes.';

-- Supabase's default privileges grant every new function to anon and authenticated (and
-- PostgreSQL grants execute to public): take that back, function by function.
revoke execute on function
    public.claim_session(uuid, text, integer, boolean),
    public.claim_sessions(text, integer, integer),
    public.sandbox_renew_lease(uuid, bigint, integer),
    public.sandbox_release(uuid, bigint),
    public.sandbox_begin_provision(uuid, bigint, integer),
    public.sandbox_set_machine(uuid, bigint, text, text),
    public.sandbox_mark_ready(uuid, bigint, integer),
    public.sandbox_mark_failed(uuid, bigint, text, integer),
    public.sandbox_begin_stop(uuid, bigint, text),
    public.sandbox_mark_destroyed(uuid, bigint),
    public.sandbox_record_event(uuid, bigint, text, jsonb),
    public.sandbox_sessions_by_ids(uuid[]),
    public.sandbox_live_sessions(integer),
    public.take_listener_lease(text, text, integer),
    public.release_listener_lease(text, text)
from public, anon, authenticated;

grant execute on function
    public.claim_session(uuid, text, integer, boolean),
    public.claim_sessions(text, integer, integer),
    public.sandbox_renew_lease(uuid, bigint, integer),
    public.sandbox_release(uuid, bigint),
    public.sandbox_begin_provision(uuid, bigint, integer),
    public.sandbox_set_machine(uuid, bigint, text, text),
    public.sandbox_mark_ready(uuid, bigint, integer),
    public.sandbox_mark_failed(uuid, bigint, text, integer),
    public.sandbox_begin_stop(uuid, bigint, text),
    public.sandbox_mark_destroyed(uuid, bigint),
    public.sandbox_record_event(uuid, bigint, text, jsonb),
    public.sandbox_sessions_by_ids(uuid[]),
    public.sandbox_live_sessions(integer),
    public.take_listener_lease(text, text, integer),
    public.release_listener_lease(text, text)
to service_role;
