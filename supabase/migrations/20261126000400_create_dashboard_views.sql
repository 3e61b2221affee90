-- What operators read: two dashboard views (sandbox_overview, sandbox_stats) and the function
-- `sandbox-listener doctor` calls to check the database side of a deployment (sandbox_doctor).
-- Both views are SECURITY INVOKER, so Row Level Security applies to whoever reads them, and
-- only service_role (the listener, the doctor) may read them; the SQL editor runs as postgres.

-- The stats read events of one kind over a recent window: index them by (event, time), so the
-- cost follows the window, not the whole audit.
create index sandbox_events_event_created_idx on public.sandbox_events (event, created_at);

-- Supabase does not let service_role read auth.users, so a SECURITY INVOKER view cannot join
-- it for service_role. This function reads one email as its owner; only service_role may call it.
create function public.sandbox_owner_email(p_user_id uuid)
    returns text
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select u.email::text from auth.users u where u.id = p_user_id;
$$;

comment on function public.sandbox_owner_email(uuid) is
    'The email of a session owner (auth.users), for sandbox_overview; service_role only.';

create view public.sandbox_overview with (security_invoker = true) as
select
    s.id,
    s.user_id,
    public.sandbox_owner_email(s.user_id) as email,
    s.status,
    s.sandbox_state,
    s.sandbox_id,
    s.sandbox_region,
    now() - s.created_at as age,
    now() - s.last_activity_at as idle_for,
    s.sandbox_expires_at - now() as expires_in,
    s.sandbox_error as last_error,
    s.sandbox_stop_reason as stop_reason,
    s.sandbox_attempts as attempts,
    s.sandbox_epoch as epoch,
    s.sandbox_claimed_by as claimed_by
from public.coding_sessions s;

comment on view public.sandbox_overview is
    'One line per coding session for operators: owner, state, machine, age, idle time, time to '
    'expiry and the last error. Read it as service_role or in the SQL editor.';
comment on column public.sandbox_overview.id is 'Session id (coding_sessions.id).';
comment on column public.sandbox_overview.user_id is 'Owner (auth.users.id).';
comment on column public.sandbox_overview.email is 'Owner''s email (auth.users.email).';
comment on column public.sandbox_overview.status is 'active or ended (set by the owner).';
comment on column public.sandbox_overview.sandbox_state is
    'requested, provisioning, ready, stopping, destroyed or failed.';
comment on column public.sandbox_overview.sandbox_id is 'Fly Machine id of the current sandbox.';
comment on column public.sandbox_overview.sandbox_region is 'Fly region of the current sandbox.';
comment on column public.sandbox_overview.age is 'Time since the session was created.';
comment on column public.sandbox_overview.idle_for is 'Time since the last activity.';
comment on column public.sandbox_overview.expires_in is
    'Time until a ready sandbox is reaped if nothing happens (negative: overdue; null: not ready).';
comment on column public.sandbox_overview.last_error is 'The last error, as a sentence (sandbox_error).';
comment on column public.sandbox_overview.stop_reason is
    'Why the sandbox was stopped: ended, deleted, idle, max_age, lost, shutdown or operator.';
comment on column public.sandbox_overview.attempts is 'Provisioning attempts so far.';
comment on column public.sandbox_overview.epoch is 'Fencing token: +1 on every claim.';
comment on column public.sandbox_overview.claimed_by is 'Listener instance holding the claim, if any.';

create view public.sandbox_stats with (security_invoker = true) as
with ready as (
    -- sandbox_ready events carry the provisioning time (claim to ready) in detail.seconds.
    select (e.detail ->> 'seconds')::double precision as seconds
    from public.sandbox_events e
    where e.event = 'sandbox_ready'
      and e.created_at > now() - interval '1 hour'
      and jsonb_typeof(e.detail -> 'seconds') = 'number'
),
reaped as (
    -- A sandbox_destroyed event lists the machines it destroyed (none if the session never had
    -- one); the sweeper records each orphan machine it destroys as orphan_destroyed.
    select
        case when e.event = 'orphan_destroyed' then 'orphan'
             else coalesce(e.detail ->> 'reason', 'unknown') end as cause,
        case when e.event = 'sandbox_destroyed' and jsonb_typeof(e.detail -> 'machines') = 'array'
             then jsonb_array_length(e.detail -> 'machines') else 1 end as machines
    from public.sandbox_events e
    where e.event in ('sandbox_destroyed', 'orphan_destroyed')
      and e.created_at > now() - interval '24 hours'
)
select
    (select coalesce(jsonb_object_agg(c.sandbox_state, c.sessions), '{}'::jsonb)
     from (select sandbox_state, count(*) as sessions
           from public.coding_sessions group by sandbox_state) c) as sessions_by_state,
    (select count(*) from ready) as provisioned_last_hour,
    (select percentile_cont(0.5) within group (order by seconds) from ready) as provisioning_p50_s,
    (select percentile_cont(0.95) within group (order by seconds) from ready) as provisioning_p95_s,
    (select coalesce(jsonb_object_agg(r.cause, r.machines), '{}'::jsonb)
     from (select cause, sum(machines) as machines from reaped
           group by cause having sum(machines) > 0) r) as machines_reaped_last_24h,
    now() as computed_at;

comment on view public.sandbox_stats is
    'One row of figures for operators and /metrics: sessions by state, provisioning time over the '
    'last hour and machines reaped by cause over the last 24 hours.';
comment on column public.sandbox_stats.sessions_by_state is
    'Sessions per sandbox_state, e.g. {"ready": 3, "destroyed": 40}; states with none are absent.';
comment on column public.sandbox_stats.provisioned_last_hour is
    'Sandboxes that became ready in the last hour.';
comment on column public.sandbox_stats.provisioning_p50_s is
    'Median seconds from claim to ready over the last hour (null: none).';
comment on column public.sandbox_stats.provisioning_p95_s is
    '95th percentile seconds from claim to ready over the last hour (null: none).';
comment on column public.sandbox_stats.machines_reaped_last_24h is
    'Machines destroyed in the last 24 hours by cause: the stop reason (ended, deleted, idle, '
    'max_age, lost, shutdown, operator) or orphan (no live session).';
comment on column public.sandbox_stats.computed_at is 'When these figures were computed.';

-- What `sandbox-listener doctor` needs to know about the database that PostgREST cannot show
-- service_role: publication membership, replica identity, and which functions and relations
-- the API roles can reach.
create function public.sandbox_doctor()
    returns jsonb
    language sql
    stable
    security invoker
    set search_path = ''
as $$
    select jsonb_build_object(
        'publication_exists', exists (
            select 1 from pg_catalog.pg_publication where pubname = 'supabase_realtime'
        ),
        'publication_tables', coalesce((
            select jsonb_agg(format('%s.%s', t.schemaname, t.tablename)
                             order by t.schemaname, t.tablename)
            from pg_catalog.pg_publication_tables t
            where t.pubname = 'supabase_realtime'
        ), '[]'::jsonb),
        'replica_identity', coalesce((
            select jsonb_object_agg(c.relname, case c.relreplident
                when 'd' then 'default' when 'f' then 'full'
                when 'i' then 'index' else 'nothing' end)
            from pg_catalog.pg_class c
            where c.relnamespace = 'public'::regnamespace
              and c.relname in ('coding_sessions', 'sandbox_commands') and c.relkind = 'r'
        ), '{}'::jsonb),
        'functions', coalesce((
            select jsonb_agg(distinct p.proname::text order by p.proname::text)
            from pg_catalog.pg_proc p
            where p.pronamespace = 'public'::regnamespace
              and has_function_privilege('service_role', p.oid, 'execute')
        ), '[]'::jsonb),
        'relations', coalesce((
            select jsonb_agg(c.relname::text order by c.relname)
            from pg_catalog.pg_class c
            where c.relnamespace = 'public'::regnamespace
              and c.relkind in ('r', 'p', 'v', 'm', 'f')
              and has_table_privilege('service_role', c.oid, 'select')
        ), '[]'::jsonb)
    );
$$;

comment on function public.sandbox_doctor() is
    'For `sandbox-listener doctor`: tables in the supabase_realtime publication, their replica '
    'identity, and the public functions and relations service_role may execute or select.';

-- Supabase's default privileges grant new views and functions to anon and authenticated (and
-- PostgreSQL grants execute to public): take that back. service_role only reads the views.
revoke all on table public.sandbox_overview, public.sandbox_stats
    from anon, authenticated, service_role;
grant select on table public.sandbox_overview, public.sandbox_stats to service_role;

revoke execute on function public.sandbox_owner_email(uuid), public.sandbox_doctor()
    from public, anon, authenticated;
grant execute on function public.sandbox_owner_email(uuid), public.sandbox_doctor()
    to service_role;
