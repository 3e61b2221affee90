-- Two fixes found in review.
--
-- 1. A released claim could still write. The transitions checked only the epoch, and a claim is
--    released (sandbox_claimed_by = null) without bumping it, so a stale job holding the
--    released epoch could, say, begin provisioning a row another job had just put back to
--    `requested` with a backoff. Every transition made under a claim now also requires that a
--    claim is held: the epoch names the claim, a null owner says it is over.
-- 2. The idle warning fired before a max-age reap too, where a keepalive cannot help. It is now
--    due only when the idle expiry comes before the hard deadline.

create or replace function public.coding_sessions_derive_sandbox_times() returns trigger
    language plpgsql
    set search_path = public, pg_temp
as $$
declare
    base timestamptz;
    idle_expiry timestamptz;
    warning_due boolean;
begin
    -- The idle clock of a fresh sandbox starts when it became ready, not when the row was made.
    idle_expiry := greatest(new.last_activity_at, new.sandbox_ready_at)
        + make_interval(secs => new.sandbox_idle_timeout_s);
    new.sandbox_expires_at := case when new.sandbox_state = 'ready' then
        least(idle_expiry, new.sandbox_deadline_at)
    end;
    -- Warn only when idleness is what will end the sandbox: a keepalive cannot move the deadline.
    new.sandbox_warn_at := case when new.sandbox_state = 'ready'
                                 and coalesce(new.sandbox_idle_warning_s, 0) > 0
                                 and (new.sandbox_deadline_at is null
                                      or idle_expiry < new.sandbox_deadline_at) then
        idle_expiry - make_interval(secs => new.sandbox_idle_warning_s)
    end;
    -- Activity that moves the expiry moves warn_at past the last warning: a new one is due.
    warning_due := new.sandbox_warn_at is not null
        and (new.sandbox_idle_warning_at is null
             or new.sandbox_idle_warning_at < new.sandbox_warn_at);

    base := case
        when new.sandbox_state in ('destroyed', 'failed') then null
        when new.status = 'ended' then now()
        when new.sandbox_state = 'requested' then
            coalesce(new.sandbox_next_attempt_at, new.created_at)
        when new.sandbox_state = 'ready' and warning_due then
            least(new.sandbox_warn_at, new.sandbox_expires_at)
        when new.sandbox_state = 'ready' then new.sandbox_expires_at
        else now()  -- provisioning, stopping: due unless a lease holds it
    end;

    -- A held lease defers attention until it lapses (greatest ignores a null lease).
    new.sandbox_due_at := case when base is not null then
        greatest(base, new.sandbox_lease_expires_at)
    end;
    return new;
end;
$$;

create or replace function public.sandbox_release(p_id uuid, p_epoch bigint)
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
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

create or replace function public.sandbox_begin_provision(p_id uuid, p_epoch bigint, p_max_lifetime_s integer)
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
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null
          and sandbox_state in ('requested', 'provisioning')
          and status = 'active'
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

create or replace function public.sandbox_set_machine(
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
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null and sandbox_state = 'provisioning'
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

create or replace function public.sandbox_mark_failed(
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
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null
          and sandbox_state in ('requested', 'provisioning', 'ready')
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

create or replace function public.sandbox_begin_stop(p_id uuid, p_epoch bigint, p_reason text)
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
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null
          and sandbox_state in ('requested', 'provisioning', 'ready', 'stopping')
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

create or replace function public.sandbox_mark_destroyed(p_id uuid, p_epoch bigint)
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
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null
          and sandbox_state in ('requested', 'provisioning', 'ready', 'stopping')
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

create or replace function public.sandbox_mark_ready(
    p_id uuid, p_epoch bigint, p_idle_timeout_s integer, p_idle_warning_s integer default 0
) returns setof public.coding_sessions
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
            sandbox_idle_warning_s = p_idle_warning_s,
            sandbox_idle_warning_at = null,
            sandbox_claimed_by = null,
            sandbox_lease_expires_at = null
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null
          and sandbox_state = 'provisioning' and sandbox_id is not null
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;

create or replace function public.sandbox_mark_idle_warning(p_id uuid, p_epoch bigint)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query
        update coding_sessions set
            sandbox_idle_warning_at = now(),
            sandbox_claimed_by = null,
            sandbox_lease_expires_at = null
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null and sandbox_state = 'ready'
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;
