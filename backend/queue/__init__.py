"""The queue and its storage: the database schema and migrations (db), jobs and their
shards, claims and leases (jobs), which job runs next (scheduling), wake-ups (notify),
commands to workers (control), leaderboard and exports (results).

No torch, no transformers: the HTTP server imports all of it. It imports only
`backend.common`; a new queue backend (another database) goes here."""
