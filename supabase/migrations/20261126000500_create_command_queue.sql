-- The command queue and an idle clock driven by real work.
--
-- Commands of one session run one at a time in insertion order (`seq`), only in a ready
-- sandbox; they are rejected with a reason once the session is ending or over. Queuing and
-- finishing a command, a running command's lease renewals and the owner's keepalive all move
-- last_activity_at, so a sandbox is never reaped while work goes on; the hard deadline
-- (max age) never moves. A warning period before the idle expiry makes the row due once, so
-- the listener records an `idle_warning` event and sets sandbox_idle_warning_at for a UI.

alter table public.sandbox_commands
    add column seq bigint generated always as identity;
comment on column public.sandbox_commands.seq is
    'Insertion order: commands of a session run in this order (FIFO), one at a time.';
create index sandbox_commands_queue_seq_idx on public.sandbox_commands (session_id, seq)
    where status in ('queued', 'running');

alter table public.coding_sessions
    add column sandbox_idle_warning_s integer,
    add column sandbox_warn_at timestamptz,
    add column sandbox_idle_warning_at timestamptz;
comment on column public.coding_sessions.sandbox_idle_warning_s is
    'Listener-owned. How long before the idle expiry the idle warning is due (0: never).';
comment on column public.coding_sessions.sandbox_warn_at is
    'Listener-owned, derived: when the idle warning is due for the current expiry.';
comment on column public.coding_sessions.sandbox_idle_warning_at is
    'Listener-owned. When the idle warning for the current expiry was recorded (watch it to '
    'offer "keep it?"; bump last_activity_at to keep the sandbox).';

create or replace function public.coding_sessions_derive_sandbox_times() returns trigger
    language plpgsql
    set search_path = public, pg_temp
as $$
declare
    base timestamptz;
    warning_due boolean;
begin
    -- The idle clock of a fresh sandbox starts when it became ready, not when the row was made.
    new.sandbox_expires_at := case when new.sandbox_state = 'ready' then
        least(
            greatest(new.last_activity_at, new.sandbox_ready_at)
                + make_interval(secs => new.sandbox_idle_timeout_s),
            new.sandbox_deadline_at
        )
    end;
    new.sandbox_warn_at := case when new.sandbox_state = 'ready'
                                 and coalesce(new.sandbox_idle_warning_s, 0) > 0 then
        new.sandbox_expires_at - make_interval(secs => new.sandbox_idle_warning_s)
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

-- Queuing a command is activity. SECURITY DEFINER: the owner's insert must move the clock even
-- where a column privilege would not let that role write it directly.
create function public.sandbox_commands_touch_session() returns trigger
    language plpgsql
    security definer
    set search_path = public, pg_temp
as $$
begin
    update coding_sessions set last_activity_at = now() where id = new.session_id;
    return new;
end;
$$;
revoke execute on function public.sandbox_commands_touch_session() from public, anon, authenticated;

create trigger sandbox_commands_touch_session
    after insert on public.sandbox_commands
    for each row execute function public.sandbox_commands_touch_session();

-- sandbox_mark_ready gains the warning period (a new signature: drop the old one so PostgREST
-- sees one function, not an ambiguous overload).
drop function public.sandbox_mark_ready(uuid, bigint, integer);
create function public.sandbox_mark_ready(
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
        where id = p_id and sandbox_epoch = p_epoch
          and sandbox_state = 'provisioning' and sandbox_id is not null
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;
comment on function public.sandbox_mark_ready(uuid, bigint, integer, integer) is
    'CAS in provisioning with a machine: -> ready, releasing the claim; the trigger sets '
    'expires_at and warn_at.';

create function public.sandbox_mark_idle_warning(p_id uuid, p_epoch bigint)
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
        where id = p_id and sandbox_epoch = p_epoch and sandbox_state = 'ready'
        returning *;
    if not found then
        return query select * from coding_sessions where id = p_id;
    end if;
end;
$$;
comment on function public.sandbox_mark_idle_warning(uuid, bigint) is
    'CAS in ready: record that the idle warning for the current expiry was given; release.';

-- The next command of a session, FIFO and one at a time. Locks the session row first, so two
-- listeners can never start two commands of one session. Also settles what cannot run: a
-- running command whose lease lapsed (its runner died: outcome unknown -> failed) and queued
-- commands of a session that is ending or over (-> rejected with the reason).
create function public.claim_next_command(p_session_id uuid, p_owner text, p_lease_s integer)
    returns setof public.sandbox_commands
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
declare
    s coding_sessions;
    next_id uuid;
begin
    select * into s from coding_sessions where id = p_session_id for no key update;

    update sandbox_commands set
        status = 'failed',
        error = 'The listener stopped while this command ran; its outcome is unknown. '
                'Run it again if that is safe.',
        finished_at = now(),
        claimed_by = null,
        lease_expires_at = null
    where session_id = p_session_id and status = 'running' and lease_expires_at < now();

    if s.id is null or s.status = 'ended'
       or s.sandbox_state in ('stopping', 'destroyed', 'failed') then
        update sandbox_commands set
            status = 'rejected',
            error = case
                when s.id is null then 'The session no longer exists.'
                when s.sandbox_state = 'failed' then
                    'The session''s sandbox failed: ' || coalesce(s.sandbox_error, 'no reason')
                else 'The session has ended; its sandbox is '
                     || case when s.sandbox_state = 'destroyed' then 'destroyed.'
                             else 'being destroyed.' end
            end,
            finished_at = now()
        where session_id = p_session_id and status = 'queued';
        return;
    end if;
    if s.sandbox_state <> 'ready' then
        return;  -- requested or provisioning: commands wait
    end if;
    if exists (select 1 from sandbox_commands
               where session_id = p_session_id and status = 'running') then
        return;  -- one at a time
    end if;

    select id into next_id from sandbox_commands
        where session_id = p_session_id and status = 'queued'
        order by seq limit 1;
    if next_id is null then
        return;
    end if;
    return query
        update sandbox_commands set
            status = 'running',
            started_at = now(),
            claimed_by = p_owner,
            lease_expires_at = now() + make_interval(secs => p_lease_s)
        where id = next_id
        returning *;
end;
$$;
comment on function public.claim_next_command(uuid, text, integer) is
    'FIFO, one at a time, only in a ready sandbox; fails lapsed runs and rejects commands of '
    'ending sessions. Zero rows: nothing to run now.';

create function public.renew_command_lease(p_id uuid, p_owner text, p_lease_s integer)
    returns setof public.sandbox_commands
    language plpgsql
    security invoker
    set search_path = public, pg_temp
as $$
declare
    c sandbox_commands;
begin
    update sandbox_commands set lease_expires_at = now() + make_interval(secs => p_lease_s)
        where id = p_id and claimed_by = p_owner and status = 'running'
        returning * into c;
    if c.id is not null then
        -- a running command is activity: the sandbox stays while it runs
        update coding_sessions set last_activity_at = now() where id = c.session_id;
        return next c;
    end if;
end;
$$;
comment on function public.renew_command_lease(uuid, text, integer) is
    'CAS on the runner: extend the lease and count the running command as activity.';

create function public.finish_command(
    p_id uuid,
    p_owner text,
    p_status text,
    p_exit_code integer default null,
    p_stdout text default null,
    p_stderr text default null,
    p_stdout_truncated boolean default false,
    p_stderr_truncated boolean default false,
    p_error text default null
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
    uuid, text, text, integer, text, text, boolean, boolean, text
) is 'CAS on the runner: write the result and count the finish as activity.';

create function public.sessions_with_pending_commands(p_limit integer default 1000)
    returns setof uuid
    language sql
    stable
    security invoker
    set search_path = public, pg_temp
as $$
    select distinct c.session_id
    from sandbox_commands c
    join coding_sessions s on s.id = c.session_id
    where (c.status = 'queued' and s.sandbox_state not in ('requested', 'provisioning'))
       or (c.status = 'running' and c.lease_expires_at < now())
    limit p_limit;
$$;
comment on function public.sessions_with_pending_commands(integer) is
    'Sessions with a command to run, reject or settle now (for the catch-up scan).';

revoke execute on function
    public.sandbox_mark_ready(uuid, bigint, integer, integer),
    public.sandbox_mark_idle_warning(uuid, bigint),
    public.claim_next_command(uuid, text, integer),
    public.renew_command_lease(uuid, text, integer),
    public.finish_command(uuid, text, text, integer, text, text, boolean, boolean, text),
    public.sessions_with_pending_commands(integer)
from public, anon, authenticated;

grant execute on function
    public.sandbox_mark_ready(uuid, bigint, integer, integer),
    public.sandbox_mark_idle_warning(uuid, bigint),
    public.claim_next_command(uuid, text, integer),
    public.renew_command_lease(uuid, text, integer),
    public.finish_command(uuid, text, text, integer, text, text, boolean, boolean, text),
    public.sessions_with_pending_commands(integer)
to service_role;
