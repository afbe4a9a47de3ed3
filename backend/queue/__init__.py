"""The queue and its storage: the database schema (db) and its migrations, jobs from
submit to finish (jobs.Queue, with its reads in reads and data-parallel endings in
shards), which job runs next (scheduling), the worker registry (workers), wake-ups
(notify), commands to workers (control), leaderboard and exports (results).

No torch, no transformers: the HTTP server imports all of it. It imports only
`backend.common`; a new queue backend (another database) goes here."""
