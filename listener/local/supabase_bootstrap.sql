-- What a Supabase database has before a project's own migrations run: the API roles, the auth
-- schema with its helper functions, the realtime publication and Supabase's default grants.
-- Mirrors supabase/postgres migrations/db/init-scripts/00000000000000-initial-schema.sql and
-- supabase/auth's auth.uid()/auth.role()/auth.jwt() definitions.

create role anon nologin noinherit;
create role authenticated nologin noinherit;
create role service_role nologin noinherit bypassrls;
create role authenticator login noinherit;
grant anon, authenticated, service_role to authenticator;
-- Supabase's own superuser. Here it has no powers and cannot log in; it exists so that a JWT
-- naming it is refused as on Supabase (permission denied to set role), not as an unknown role.
create role supabase_admin nologin noinherit;
alter role anon set statement_timeout = '3s';
alter role authenticated set statement_timeout = '8s';

create schema if not exists extensions;
grant usage on schema extensions to anon, authenticated, service_role;

create schema auth;
grant usage on schema auth to anon, authenticated, service_role;

create table auth.users (
    id uuid primary key default gen_random_uuid(),
    email text unique,
    role text not null default 'authenticated',
    raw_app_meta_data jsonb not null default '{}'::jsonb,
    raw_user_meta_data jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
-- As on hosted Supabase, the API roles (service_role included) cannot read auth.users.

create function auth.uid() returns uuid language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create function auth.role() returns text language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create function auth.email() returns text language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.email', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
  )::text
$$;

create function auth.jwt() returns jsonb language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

grant execute on function auth.uid(), auth.role(), auth.email(), auth.jwt()
  to anon, authenticated, service_role;

create publication supabase_realtime;

-- Supabase's default privileges: everything in public is granted to the API roles; RLS and
-- revokes in the project's migrations narrow it.
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;

-- Where the Supabase CLI records applied migrations.
create schema supabase_migrations;
create table supabase_migrations.schema_migrations (
    version text primary key,
    name text,
    statements text[]
);
