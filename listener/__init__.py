"""Sandbox listener: turns Supabase coding_sessions rows into Fly.io sandbox Machines."""

__version__ = "0.1.0"
