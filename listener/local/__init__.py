"""The local stack: Postgres + Supabase bootstrap, REST and Realtime gateways, Fly emulator."""
