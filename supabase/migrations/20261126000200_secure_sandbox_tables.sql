-- Who may do what with the sandbox tables. Supabase's default privileges grant everything in
-- public to anon and authenticated, so each table first loses all of it and then gets back only
-- what its owner-facing API needs; Row Level Security picks the rows. anon gets nothing at all.
-- service_role (the listener) keeps full grants and bypasses RLS.

alter table public.coding_sessions enable row level security;
alter table public.sandbox_events enable row level security;
alter table public.sandbox_commands enable row level security;
alter table public.listener_leases enable row level security;

revoke all on table public.coding_sessions, public.sandbox_events, public.sandbox_commands,
    public.listener_leases from anon, authenticated;
revoke all on sequence public.sandbox_events_id_seq from anon, authenticated;
-- The app may have created coding_sessions before Supabase's default grants applied to it.
grant all on table public.coding_sessions, public.sandbox_commands, public.listener_leases
    to service_role;

-- coding_sessions: the owner inserts, keeps alive, ends and deletes their own sessions. Column
-- privileges keep the sandbox_* columns (and created_at/updated_at) out of the owner's writes;
-- an insert or update naming one of them fails with "permission denied".
grant select, delete on table public.coding_sessions to authenticated;
grant insert (id, user_id, status, last_activity_at, requested_region, requested_memory_mb,
    requested_cpus) on table public.coding_sessions to authenticated;
grant update (status, last_activity_at) on table public.coding_sessions to authenticated;

create policy coding_sessions_select_own on public.coding_sessions
    for select to authenticated
    using (user_id = (select auth.uid()));
create policy coding_sessions_insert_own on public.coding_sessions
    for insert to authenticated
    with check (user_id = (select auth.uid()));
create policy coding_sessions_update_own on public.coding_sessions
    for update to authenticated
    using (user_id = (select auth.uid()))
    with check (user_id = (select auth.uid()));
create policy coding_sessions_delete_own on public.coding_sessions
    for delete to authenticated
    using (user_id = (select auth.uid()));

-- sandbox_events: append-only for everyone but the table owner (no update, delete or truncate,
-- not even for service_role); the owner of a session reads its history.
revoke all on table public.sandbox_events from service_role;
grant select, insert on table public.sandbox_events to service_role;
grant select on table public.sandbox_events to authenticated;

create policy sandbox_events_select_own on public.sandbox_events
    for select to authenticated
    using (exists (
        select 1 from public.coding_sessions s
        where s.id = sandbox_events.session_id and s.user_id = (select auth.uid())
    ));

-- sandbox_commands: the owner queues commands for their own sessions and reads the results;
-- only the listener writes results, so they cannot be forged (no update or delete for owners).
grant select on table public.sandbox_commands to authenticated;
grant insert (id, session_id, user_id, command, stdin, timeout_s)
    on table public.sandbox_commands to authenticated;

create policy sandbox_commands_select_own on public.sandbox_commands
    for select to authenticated
    using (user_id = (select auth.uid()));
create policy sandbox_commands_insert_own on public.sandbox_commands
    for insert to authenticated
    with check (
        user_id = (select auth.uid())
        and exists (
            select 1 from public.coding_sessions s
            where s.id = sandbox_commands.session_id and s.user_id = (select auth.uid())
        )
    );

-- listener_leases: no grants and no policies for anon/authenticated.

-- Trigger functions cannot be called directly, but they are not the API either.
revoke execute on function public.coding_sessions_touch_updated_at(),
    public.coding_sessions_forbid_reopen(), public.coding_sessions_derive_sandbox_times()
    from public, anon, authenticated;

-- Realtime: the listener hears coding_sessions changes, owners hear their command results.
-- REPLICA IDENTITY stays DEFAULT (old record = primary key): the listener only needs the id of
-- an updated or deleted row, and Realtime reduces a DELETE's old_record to the primary key under
-- RLS even with FULL. The app may already have published coding_sessions.
do $$
declare
    tbl text;
begin
    if exists (select 1 from pg_publication where pubname = 'supabase_realtime' and puballtables) then
        return;
    end if;
    foreach tbl in array array['coding_sessions', 'sandbox_commands'] loop
        if not exists (
            select 1 from pg_publication_tables
            where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = tbl
        ) then
            execute format('alter publication supabase_realtime add table public.%I', tbl);
        end if;
    end loop;
end;
$$;
