-- The sandbox listener's tables: coding_sessions (app side + sandbox side), the sandbox_events
-- audit, sandbox_commands and the sweeper's leader lease; plus the triggers that keep the
-- derived columns (updated_at, sandbox_expires_at, sandbox_due_at) true on every write.
-- Security (RLS, grants, publication) is in the next migration, the listener's functions after.

-- The app may already own coding_sessions. Create it bare if absent, then add every column with
-- `add column if not exists`, so each column is defined once and an existing table keeps its
-- own definition of any column it already has.
create table if not exists public.coding_sessions (
    id uuid primary key default gen_random_uuid()
);

alter table public.coding_sessions
    add column if not exists user_id uuid not null default auth.uid()
        references auth.users (id) on delete cascade,
    add column if not exists status text not null default 'active'
        constraint coding_sessions_status_check check (status in ('active', 'ended')),
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now(),
    add column if not exists last_activity_at timestamptz not null default now(),
    add column if not exists requested_region text,
    add column if not exists requested_memory_mb integer
        constraint coding_sessions_requested_memory_mb_positive check (requested_memory_mb > 0),
    add column if not exists requested_cpus integer
        constraint coding_sessions_requested_cpus_positive check (requested_cpus > 0),
    add column if not exists sandbox_state text not null default 'requested'
        constraint coding_sessions_sandbox_state_check check (
            sandbox_state in ('requested', 'provisioning', 'ready', 'stopping', 'destroyed', 'failed')
        ),
    add column if not exists sandbox_id text,
    add column if not exists sandbox_region text,
    add column if not exists sandbox_error text,
    add column if not exists sandbox_attempts integer not null default 0,
    add column if not exists sandbox_epoch bigint not null default 0,
    add column if not exists sandbox_claimed_by text,
    add column if not exists sandbox_lease_expires_at timestamptz,
    add column if not exists sandbox_next_attempt_at timestamptz,
    add column if not exists sandbox_ready_at timestamptz,
    add column if not exists sandbox_deadline_at timestamptz,
    add column if not exists sandbox_idle_timeout_s integer,
    add column if not exists sandbox_expires_at timestamptz,
    add column if not exists sandbox_destroyed_at timestamptz,
    add column if not exists sandbox_stop_reason text,
    add column if not exists sandbox_due_at timestamptz;

comment on table public.coding_sessions is
    'One coding session of a user. App-side columns are written by the owner; sandbox_* columns '
    'only by the sandbox listener (service_role), which turns each row into a Fly Machine.';
comment on column public.coding_sessions.id is 'Session id; also the Fly Machine metadata session_id.';
comment on column public.coding_sessions.user_id is 'Owner (auth.users.id); defaults to the caller.';
comment on column public.coding_sessions.status is
    'active or ended (set by the owner). Ending destroys the sandbox; an ended session cannot be reopened.';
comment on column public.coding_sessions.created_at is 'When the session was created.';
comment on column public.coding_sessions.updated_at is 'When the row last changed (kept by a trigger).';
comment on column public.coding_sessions.last_activity_at is
    'Last sign of use (a command, a keepalive from the owner); the idle timeout counts from here.';
comment on column public.coding_sessions.requested_region is
    'Fly region the owner asks for (e.g. ams); null = the listener default. Disallowed values fail the sandbox.';
comment on column public.coding_sessions.requested_memory_mb is
    'Sandbox memory the owner asks for, in MB; null = default. Must be one the listener allows.';
comment on column public.coding_sessions.requested_cpus is
    'Sandbox CPU count the owner asks for; null = default. Must be one the listener allows.';
comment on column public.coding_sessions.sandbox_state is
    'requested -> provisioning -> ready -> stopping -> destroyed, or failed (listener only).';
comment on column public.coding_sessions.sandbox_id is 'Fly Machine id of the current sandbox, once known.';
comment on column public.coding_sessions.sandbox_region is 'Fly region the current sandbox runs in.';
comment on column public.coding_sessions.sandbox_error is
    'The last error, as a sentence a person can act on; kept while a retry is pending.';
comment on column public.coding_sessions.sandbox_attempts is 'How many times provisioning was started.';
comment on column public.coding_sessions.sandbox_epoch is
    'Fencing token: +1 on every claim; every listener write is a compare-and-set on it.';
comment on column public.coding_sessions.sandbox_claimed_by is 'Listener instance holding the claim, if any.';
comment on column public.coding_sessions.sandbox_lease_expires_at is
    'When the current claim lapses; after that another listener may take the row over.';
comment on column public.coding_sessions.sandbox_next_attempt_at is
    'Earliest time of the next provisioning attempt after a retryable failure.';
comment on column public.coding_sessions.sandbox_ready_at is 'When the current sandbox became ready.';
comment on column public.coding_sessions.sandbox_deadline_at is
    'Hard maximum-age deadline of the current sandbox, regardless of activity.';
comment on column public.coding_sessions.sandbox_idle_timeout_s is
    'Idle timeout of the current sandbox, in seconds.';
comment on column public.coding_sessions.sandbox_expires_at is
    'When the ready sandbox will be reaped if nothing happens: the idle timeout counted from the later '
    'of last_activity_at and sandbox_ready_at, capped at sandbox_deadline_at (kept by a trigger).';
comment on column public.coding_sessions.sandbox_destroyed_at is 'When the sandbox was destroyed.';
comment on column public.coding_sessions.sandbox_stop_reason is
    'Why the sandbox was stopped: ended, deleted, idle, max_age, lost, shutdown or operator.';
comment on column public.coding_sessions.sandbox_due_at is
    'Next time the row needs the listener; null = never (kept by a trigger).';

-- Every listener query selects by due time, so its cost follows what is due, not the table size.
create index coding_sessions_due_idx on public.coding_sessions (sandbox_due_at)
    where sandbox_due_at is not null;
create index coding_sessions_user_id_idx on public.coding_sessions (user_id);
-- Machines that may exist, for the reconcile against the Fly inventory.
create index coding_sessions_live_idx on public.coding_sessions (id)
    where sandbox_state in ('provisioning', 'ready', 'stopping');

create function public.coding_sessions_touch_updated_at() returns trigger
    language plpgsql
    set search_path = public, pg_temp
as $$
begin
    new.updated_at := now();
    return new;
end;
$$;

create trigger coding_sessions_touch_updated_at
    before update on public.coding_sessions
    for each row execute function public.coding_sessions_touch_updated_at();

create function public.coding_sessions_forbid_reopen() returns trigger
    language plpgsql
    set search_path = public, pg_temp
as $$
begin
    if old.status = 'ended' and new.status <> 'ended' then
        raise exception 'coding session % has ended and cannot be reopened', old.id
            using errcode = 'check_violation', hint = 'Create a new session instead.';
    end if;
    return new;
end;
$$;

create trigger coding_sessions_forbid_reopen
    before update of status on public.coding_sessions
    for each row execute function public.coding_sessions_forbid_reopen();

-- sandbox_expires_at and sandbox_due_at are derived from the other columns on every write, so
-- no writer (owner keepalive, listener function, operator in the dashboard) can leave them stale.
create function public.coding_sessions_derive_sandbox_times() returns trigger
    language plpgsql
    set search_path = public, pg_temp
as $$
declare
    base timestamptz;
begin
    -- The idle clock of a fresh sandbox starts when it became ready, not when the row was made.
    new.sandbox_expires_at := case when new.sandbox_state = 'ready' then
        least(
            greatest(new.last_activity_at, new.sandbox_ready_at)
                + make_interval(secs => new.sandbox_idle_timeout_s),
            new.sandbox_deadline_at
        )
    end;

    base := case
        when new.sandbox_state in ('destroyed', 'failed') then null
        when new.status = 'ended' then now()
        when new.sandbox_state = 'requested' then
            coalesce(new.sandbox_next_attempt_at, new.created_at)
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

create trigger coding_sessions_derive_sandbox_times
    before insert or update on public.coding_sessions
    for each row execute function public.coding_sessions_derive_sandbox_times();

create table public.sandbox_events (
    id bigint generated always as identity primary key,
    -- No foreign key: the audit outlives a deleted session.
    session_id uuid not null,
    epoch bigint,
    event text not null,
    detail jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now()
);

comment on table public.sandbox_events is
    'Append-only audit of every sandbox: what the listener did and saw, per session and epoch.';
comment on column public.sandbox_events.id is 'Event id, increasing.';
comment on column public.sandbox_events.session_id is
    'The coding session (no foreign key: events survive a deleted session).';
comment on column public.sandbox_events.epoch is 'Session epoch the listener acted under, if any.';
comment on column public.sandbox_events.event is 'What happened, e.g. machine_created, sandbox_ready.';
comment on column public.sandbox_events.detail is 'Details as JSON (ids, errors, timings).';
comment on column public.sandbox_events.created_at is 'When it was recorded.';

create index sandbox_events_session_created_idx on public.sandbox_events (session_id, created_at);

create table public.sandbox_commands (
    id uuid primary key default gen_random_uuid(),
    session_id uuid not null references public.coding_sessions (id) on delete cascade,
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    command text[] not null,
    stdin text,
    timeout_s integer not null default 60,
    status text not null default 'queued',
    exit_code integer,
    stdout text,
    stderr text,
    stdout_truncated boolean not null default false,
    stderr_truncated boolean not null default false,
    error text,
    claimed_by text,
    lease_expires_at timestamptz,
    created_at timestamptz not null default now(),
    started_at timestamptz,
    finished_at timestamptz,
    constraint sandbox_commands_status_check check (
        status in ('queued', 'running', 'succeeded', 'failed', 'timed_out', 'rejected')
    ),
    constraint sandbox_commands_command_not_empty check (cardinality(command) >= 1),
    constraint sandbox_commands_command_one_dimensional check (array_ndims(command) = 1),
    constraint sandbox_commands_command_max_args check (cardinality(command) <= 256),
    constraint sandbox_commands_command_no_null_args check (array_position(command, null) is null),
    constraint sandbox_commands_command_max_bytes check (
        octet_length(array_to_string(command, '')) <= 65536
    ),
    constraint sandbox_commands_stdin_max_bytes check (octet_length(stdin) <= 1048576),
    constraint sandbox_commands_timeout_s_range check (timeout_s between 1 and 3600)
);

comment on table public.sandbox_commands is
    'Commands to run in a session''s sandbox (inserted by the owner) and their results (written by the listener).';
comment on column public.sandbox_commands.id is 'Command id.';
comment on column public.sandbox_commands.session_id is 'The coding session whose sandbox runs it.';
comment on column public.sandbox_commands.user_id is 'Owner (auth.users.id); defaults to the caller.';
comment on column public.sandbox_commands.command is 'argv: program and arguments (1-256, at most 64 KiB in all).';
comment on column public.sandbox_commands.stdin is 'Standard input, at most 1 MiB.';
comment on column public.sandbox_commands.timeout_s is 'Time limit in seconds (1-3600).';
comment on column public.sandbox_commands.status is 'queued, running, succeeded, failed, timed_out or rejected.';
comment on column public.sandbox_commands.exit_code is 'Exit code of the process, once finished.';
comment on column public.sandbox_commands.stdout is 'Standard output, truncated to the listener''s limit.';
comment on column public.sandbox_commands.stderr is 'Standard error, truncated to the listener''s limit.';
comment on column public.sandbox_commands.stdout_truncated is 'Whether stdout was cut to the limit.';
comment on column public.sandbox_commands.stderr_truncated is 'Whether stderr was cut to the limit.';
comment on column public.sandbox_commands.error is 'Why the command failed or was rejected, for people.';
comment on column public.sandbox_commands.claimed_by is 'Listener instance running it, if any.';
comment on column public.sandbox_commands.lease_expires_at is 'When the running claim lapses.';
comment on column public.sandbox_commands.created_at is 'When it was queued.';
comment on column public.sandbox_commands.started_at is 'When it started running.';
comment on column public.sandbox_commands.finished_at is 'When it finished.';

-- The listener's queue of pending commands per session.
create index sandbox_commands_pending_idx on public.sandbox_commands (session_id, created_at)
    where status in ('queued', 'running');
-- History per session, and the on-delete-cascade lookup from coding_sessions.
create index sandbox_commands_session_created_idx on public.sandbox_commands (session_id, created_at);
create index sandbox_commands_user_id_idx on public.sandbox_commands (user_id);

create table public.listener_leases (
    name text primary key,
    owner text not null,
    expires_at timestamptz not null
);

comment on table public.listener_leases is 'Named leases between listener replicas (e.g. the sweeper leader).';
comment on column public.listener_leases.name is 'Lease name, e.g. sweeper.';
comment on column public.listener_leases.owner is 'Listener instance holding it.';
comment on column public.listener_leases.expires_at is 'When it lapses unless renewed.';
