-- Supabase's default privileges grant every new sequence to anon and authenticated; the
-- identity sequence behind sandbox_commands.seq (added by the command-queue migration) is the
-- listener's business only.
revoke all on sequence public.sandbox_commands_seq_seq from anon, authenticated;
