"""The local stack: embedded Postgres with a Supabase bootstrap, REST/Realtime gateways, Fly emulator."""
