-- Tenant isolation and poison input (issue "Hardening").
--
-- 1. Machine identity is the row *incarnation*, never the session id. Users could choose a
--    session's id and learn other users' ids from Realtime DELETE events, so a reused id could
--    reach the machine of the row that had it before. Now the server makes every key that names
--    a machine: ids are no longer insertable by users, and each row gets a random
--    sandbox_incarnation at insert that no writer can set or change. The listener tags machines
--    with it and adopts, reconciles and reports only on it.
-- 2. A deleted row leaves a tombstone (its incarnation and machine), so its machine is destroyed
--    promptly even when the id is reused at once, and even if every listener was down.
-- 3. Audit rows carry the owner and incarnation they were written for; the policy checks that,
--    so a later owner of an id reads nothing of an earlier one.
-- 4. Owner-writable values are refused at the door when the listener could not use them
--    (non-finite or future times, malformed regions, absurd sizes), with a clear message.
-- 5. Limits a multi-tenant service needs: live sandboxes per user (atomic, in the claim), and
--    queued commands per session.
-- 6. Command output that Postgres text cannot hold is stored replaced, with a flag.

-- 1. incarnations ---------------------------------------------------------------------------

alter table public.coding_sessions add column sandbox_incarnation uuid;
update public.coding_sessions set sandbox_incarnation = gen_random_uuid()
    where sandbox_incarnation is null;
alter table public.coding_sessions
    alter column sandbox_incarnation set default gen_random_uuid(),
    alter column sandbox_incarnation set not null;
create unique index coding_sessions_incarnation_key
    on public.coding_sessions (sandbox_incarnation);
comment on column public.coding_sessions.sandbox_incarnation is
    'Server-made key of this row incarnation, never reused and never changed; the machine''s '
    'metadata carries it, and the listener matches machines on it, never on the id alone.';

create function public.coding_sessions_stamp_incarnation() returns trigger
    language plpgsql
    set search_path = public, pg_temp
as $$
begin
    if tg_op = 'INSERT' then
        new.sandbox_incarnation := gen_random_uuid();  -- whatever the writer sent
    else
        new.sandbox_incarnation := old.sandbox_incarnation;
    end if;
    return new;
end;
$$;

create trigger coding_sessions_stamp_incarnation
    before insert or update on public.coding_sessions
    for each row execute function public.coding_sessions_stamp_incarnation();

-- The server makes session and command ids: a frontend reads them back with insert().select().
revoke insert (id) on table public.coding_sessions from authenticated;
revoke insert (id) on table public.sandbox_commands from authenticated;

-- 2. tombstones -----------------------------------------------------------------------------

create table public.sandbox_tombstones (
    incarnation uuid primary key,
    session_id uuid not null,
    user_id uuid,
    sandbox_id text,
    deleted_at timestamptz not null default now(),
    claimed_by text,
    lease_expires_at timestamptz
);
comment on table public.sandbox_tombstones is
    'Deleted sessions whose machines the listener has yet to destroy (listener only).';
comment on column public.sandbox_tombstones.incarnation is 'The deleted row''s incarnation.';
comment on column public.sandbox_tombstones.session_id is 'The deleted row''s id.';
comment on column public.sandbox_tombstones.user_id is 'The deleted row''s owner.';
comment on column public.sandbox_tombstones.sandbox_id is 'Its machine, if one was recorded.';
comment on column public.sandbox_tombstones.deleted_at is 'When the row was deleted.';
comment on column public.sandbox_tombstones.claimed_by is 'Listener destroying its machines.';
comment on column public.sandbox_tombstones.lease_expires_at is 'When that claim lapses.';
create index sandbox_tombstones_session_idx on public.sandbox_tombstones (session_id);

alter table public.sandbox_tombstones enable row level security;
revoke all on table public.sandbox_tombstones from anon, authenticated;
grant all on table public.sandbox_tombstones to service_role;

-- SECURITY DEFINER: the owner deleting a row has no rights on the tombstones.
create function public.coding_sessions_leave_tombstone() returns trigger
    language plpgsql
    security definer
    set search_path = public, pg_temp
as $$
begin
    if old.sandbox_state <> 'destroyed' then
        insert into sandbox_tombstones (incarnation, session_id, user_id, sandbox_id)
        values (old.sandbox_incarnation, old.id, old.user_id, old.sandbox_id)
        on conflict (incarnation) do nothing;
    end if;
    return old;
end;
$$;

create trigger coding_sessions_leave_tombstone
    after delete on public.coding_sessions
    for each row execute function public.coding_sessions_leave_tombstone();

create function public.claim_tombstones(
    p_owner text, p_lease_s integer, p_limit integer, p_session_id uuid default null
) returns setof public.sandbox_tombstones
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query
        with free as (
            select incarnation from sandbox_tombstones
            where (p_session_id is null or session_id = p_session_id)
              and (lease_expires_at is null or lease_expires_at <= now())
            order by deleted_at
            limit p_limit
            for update skip locked
        )
        update sandbox_tombstones t set
            claimed_by = p_owner,
            lease_expires_at = now() + make_interval(secs => p_lease_s)
        from free
        where t.incarnation = free.incarnation
        returning t.*;
end;
$$;
comment on function public.claim_tombstones(text, integer, integer, uuid) is
    'Claim up to p_limit tombstones (of one session when p_session_id is given) whose lease is '
    'free or lapsed; concurrent callers get disjoint sets.';

create function public.sandbox_bury(p_incarnation uuid, p_owner text)
    returns boolean
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    delete from sandbox_tombstones where incarnation = p_incarnation and claimed_by = p_owner;
    return found;
end;
$$;
comment on function public.sandbox_bury(uuid, text) is
    'Forget a tombstone whose machines p_owner destroyed; false if p_owner no longer held it.';

-- 3. the audit names its owner ----------------------------------------------------------------

alter table public.sandbox_events
    add column user_id uuid,
    add column incarnation uuid;
comment on column public.sandbox_events.user_id is
    'Owner of the session incarnation the event was written for; only they may read it.';
comment on column public.sandbox_events.incarnation is
    'The session incarnation the event was written for (null: before incarnations existed).';
-- Events older than the current row belong to an earlier row with that id: nobody's now.
update public.sandbox_events e set user_id = s.user_id, incarnation = s.sandbox_incarnation
    from public.coding_sessions s
    where s.id = e.session_id and e.created_at >= s.created_at;
create index sandbox_events_user_id_idx on public.sandbox_events (user_id);

drop policy sandbox_events_select_own on public.sandbox_events;
create policy sandbox_events_select_own on public.sandbox_events
    for select to authenticated
    using (user_id = (select auth.uid()));

drop function public.sandbox_record_event(uuid, bigint, text, jsonb);
create function public.sandbox_record_event(
    p_session_id uuid, p_incarnation uuid, p_epoch bigint, p_event text,
    p_detail jsonb default '{}'::jsonb
) returns public.sandbox_events
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
declare
    owner_id uuid;
    recorded sandbox_events;
begin
    -- The owner of that incarnation, live or deleted; never whoever holds the id now.
    select user_id into owner_id from coding_sessions
        where id = p_session_id and sandbox_incarnation = p_incarnation;
    if owner_id is null then
        select user_id into owner_id from sandbox_tombstones where incarnation = p_incarnation;
    end if;
    insert into sandbox_events (session_id, user_id, incarnation, epoch, event, detail)
    values (p_session_id, owner_id, p_incarnation, p_epoch, p_event,
            coalesce(p_detail, '{}'::jsonb))
    returning * into recorded;
    return recorded;
end;
$$;
comment on function public.sandbox_record_event(uuid, uuid, bigint, text, jsonb) is
    'Append one event for a session incarnation; its owner (live row or tombstone) may read it.';

-- 4. owner input the listener can use ---------------------------------------------------------

alter table public.coding_sessions
    add constraint coding_sessions_requested_region_format
        check (requested_region ~ '^[a-z0-9]{2,8}$'),
    add constraint coding_sessions_requested_memory_mb_max
        check (requested_memory_mb <= 131072),
    add constraint coding_sessions_requested_cpus_max check (requested_cpus <= 64);

-- Times must be real: finite for every writer; and from a user, not before the session nor in
-- the future beyond a client's clock skew (a little skew is clamped to now). 'now' is a valid
-- value to send.
create function public.coding_sessions_check_times() returns trigger
    language plpgsql
    set search_path = public, pg_temp
as $$
begin
    if tg_op = 'UPDATE' and new.last_activity_at is not distinct from old.last_activity_at then
        return new;
    end if;
    if new.last_activity_at is null or not isfinite(new.last_activity_at) then
        raise exception 'last_activity_at must be a finite time, not %', new.last_activity_at
            using errcode = 'check_violation', hint = 'Send ''now'' to mark activity.';
    end if;
    if current_user not in ('anon', 'authenticated') then
        return new;  -- the listener, the app's service code, an operator: trusted to backdate
    end if;
    if new.last_activity_at > now() + interval '5 minutes' then
        raise exception 'last_activity_at may not be in the future'
            using errcode = 'check_violation', hint = 'Send ''now'' to mark activity.';
    end if;
    if new.created_at is not null and new.last_activity_at < new.created_at then
        raise exception 'last_activity_at may not be before the session was created'
            using errcode = 'check_violation', hint = 'Send ''now'' to mark activity.';
    end if;
    new.last_activity_at := least(new.last_activity_at, now());
    return new;
end;
$$;

-- Named to run before coding_sessions_derive_sandbox_times (triggers fire in name order).
create trigger coding_sessions_check_times
    before insert or update on public.coding_sessions
    for each row execute function public.coding_sessions_check_times();

-- A row the listener cannot parse (a value written past these checks, e.g. by the app's own
-- service code) fails alone, claimed or not; a CAS on the epoch it was read at.
create function public.sandbox_fail_unreadable(p_id uuid, p_epoch bigint, p_error text)
    returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
begin
    return query
        update coding_sessions set
            sandbox_state = 'failed',
            sandbox_error = left(p_error, 500),
            sandbox_claimed_by = null,
            sandbox_lease_expires_at = null
        where id = p_id and sandbox_epoch = p_epoch
          and sandbox_state not in ('destroyed', 'failed')
        returning *;
end;
$$;
comment on function public.sandbox_fail_unreadable(uuid, bigint, text) is
    'CAS on the epoch, claimed or not: fail a row the listener cannot read, with the reason.';

-- 5. limits -----------------------------------------------------------------------------------

-- Starting to provision counts the owner's live sandboxes under a per-user lock, so replicas
-- and bursts cannot exceed p_max_live_per_user (0: no limit). A refused row fails for good.
drop function public.sandbox_begin_provision(uuid, bigint, integer);
create function public.sandbox_begin_provision(
    p_id uuid, p_epoch bigint, p_max_lifetime_s integer, p_max_live_per_user integer default 0
) returns setof public.coding_sessions
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
declare
    cur coding_sessions;
    live integer;
begin
    select * into cur from coding_sessions
        where id = p_id and sandbox_epoch = p_epoch and sandbox_claimed_by is not null
          and sandbox_state in ('requested', 'provisioning') and status = 'active'
        for update;
    if not found then
        return query select * from coding_sessions where id = p_id;
        return;
    end if;
    if cur.sandbox_state = 'requested' and p_max_live_per_user > 0 then
        perform pg_advisory_xact_lock(hashtextextended('sandbox_user:' || cur.user_id::text, 0));
        select count(*) into live from coding_sessions
            where user_id = cur.user_id and id <> p_id
              and sandbox_state in ('provisioning', 'ready');
        if live >= p_max_live_per_user then
            return query
                update coding_sessions set
                    sandbox_state = 'failed',
                    sandbox_error = format(
                        'You already have %s live sandboxes, the most allowed at once; end one '
                        'of them, then start a new session.', live),
                    sandbox_claimed_by = null,
                    sandbox_lease_expires_at = null
                where id = p_id
                returning *;
            return;
        end if;
    end if;
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
        where id = p_id
        returning *;
end;
$$;
comment on function public.sandbox_begin_provision(uuid, bigint, integer, integer) is
    'CAS on a claimed active session in requested/provisioning: -> provisioning (from requested '
    'it counts an attempt and sets the hard deadline), or -> failed when the owner already has '
    'p_max_live_per_user sandboxes provisioning or ready (0: no limit).';

create function public.sandbox_commands_limit_queue() returns trigger
    language plpgsql
    security definer
    set search_path = public, pg_temp
as $$
declare
    queued integer;
begin
    -- Serialise inserts per session so concurrent ones cannot pass the limit together.
    perform 1 from coding_sessions where id = new.session_id for no key update;
    select count(*) into queued from sandbox_commands
        where session_id = new.session_id and status = 'queued';
    if queued >= 100 then
        raise exception 'this session already has % queued commands, the most allowed', queued
            using errcode = 'check_violation',
                  hint = 'Wait for queued commands to finish before queuing more.';
    end if;
    return new;
end;
$$;

create trigger sandbox_commands_limit_queue
    before insert on public.sandbox_commands
    for each row execute function public.sandbox_commands_limit_queue();

-- 6. output that text cannot hold --------------------------------------------------------------

alter table public.sandbox_commands
    add column output_replaced boolean not null default false;
comment on column public.sandbox_commands.output_replaced is
    'Whether stdout or stderr held bytes Postgres text cannot store (NUL, invalid UTF-8), '
    'stored as U+FFFD.';

drop function public.finish_command(uuid, text, text, integer, text, text, boolean, boolean, text);
create function public.finish_command(
    p_id uuid,
    p_owner text,
    p_status text,
    p_exit_code integer default null,
    p_stdout text default null,
    p_stderr text default null,
    p_stdout_truncated boolean default false,
    p_stderr_truncated boolean default false,
    p_error text default null,
    p_output_replaced boolean default false
) returns setof public.sandbox_commands
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
declare
    c sandbox_commands;
begin
    if p_status not in ('succeeded', 'failed', 'timed_out', 'rejected') then
        raise exception 'finish_command: % is not a final status', p_status
            using errcode = '22023';
    end if;
    update sandbox_commands set
        status = p_status,
        exit_code = p_exit_code,
        stdout = p_stdout,
        stderr = p_stderr,
        stdout_truncated = p_stdout_truncated,
        stderr_truncated = p_stderr_truncated,
        output_replaced = p_output_replaced,
        error = p_error,
        finished_at = now(),
        claimed_by = null,
        lease_expires_at = null
    where id = p_id and claimed_by = p_owner and status = 'running'
    returning * into c;
    if c.id is null then
        return;
    end if;
    update coding_sessions set last_activity_at = now() where id = c.session_id;
    return next c;
end;
$$;
comment on function public.finish_command(
    uuid, text, text, integer, text, text, boolean, boolean, text, boolean
) is 'CAS on the runner: write the result and count the finish as activity.';

-- privileges ------------------------------------------------------------------------------------

revoke execute on function
    public.coding_sessions_stamp_incarnation(),
    public.coding_sessions_leave_tombstone(),
    public.coding_sessions_check_times(),
    public.sandbox_commands_limit_queue(),
    public.claim_tombstones(text, integer, integer, uuid),
    public.sandbox_bury(uuid, text),
    public.sandbox_fail_unreadable(uuid, bigint, text),
    public.sandbox_record_event(uuid, uuid, bigint, text, jsonb),
    public.sandbox_begin_provision(uuid, bigint, integer, integer),
    public.finish_command(uuid, text, text, integer, text, text, boolean, boolean, text, boolean)
from public, anon, authenticated;

grant execute on function
    public.claim_tombstones(text, integer, integer, uuid),
    public.sandbox_bury(uuid, text),
    public.sandbox_fail_unreadable(uuid, bigint, text),
    public.sandbox_record_event(uuid, uuid, bigint, text, jsonb),
    public.sandbox_begin_provision(uuid, bigint, integer, integer),
    public.finish_command(uuid, text, text, integer, text, text, boolean, boolean, text, boolean)
to service_role;
