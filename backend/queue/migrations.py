"""The schema's migrations, in order: each a small step written with Alembic's
operations so it runs on SQLite and PostgreSQL alike (db.py applies those missing).
Append only: never edit a migration that has shipped, add the next one, and make the
same change to the ORM models in db.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa


def _m001_initial(op: Any) -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model", sa.String(1024), nullable=False),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("worker_id", sa.String(128)),
        sa.Column("lease_expires_at", sa.DateTime),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("progress_done", sa.Integer, nullable=False),
        sa.Column("progress_total", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("events", sa.JSON, nullable=False),
    )
    op.create_index("ix_jobs_state_id", "jobs", ["state", "id"])
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("prediction", sa.Text, nullable=False),
        sa.Column("score", sa.Float),
        sa.Column("latency_s", sa.Float, nullable=False),
        sa.Column("output_tokens", sa.Integer),
        sa.Column("peak_rss_bytes", sa.BigInteger),
        sa.Column("peak_gpu_bytes", sa.BigInteger),
        sa.Column("fields", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("job_id", "idx", name="uq_samples_job_idx"),
    )
    op.create_index("ix_samples_job_id", "samples", ["job_id"])
    for table in ("scores", "memory_peaks"):
        extra = ([sa.Column("name", sa.String(64), nullable=False),
                  sa.Column("value", sa.Float, nullable=False),
                  sa.Column("count", sa.Integer, nullable=False),
                  sa.Column("labels", sa.JSON, nullable=False)]
                 if table == "scores" else
                 [sa.Column("name", sa.String(64), nullable=False),
                  sa.Column("device", sa.String(32), nullable=False),
                  sa.Column("bytes", sa.BigInteger, nullable=False)])
        op.create_table(
            table,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                      nullable=False),
            *extra,
        )
        op.create_index(f"ix_{table}_job_id", table, ["job_id"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("current_job_id", sa.Integer),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("heartbeat_at", sa.DateTime, nullable=False),
    )


def _m002_manager_channel(op: Any) -> None:
    op.create_table(
        "worker_status",
        sa.Column("worker_id", sa.String(128), primary_key=True),
        sa.Column("status", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "control_commands",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("worker_id", sa.String(128), nullable=False),
        sa.Column("command", sa.String(32), nullable=False),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("done_at", sa.DateTime),
    )
    op.create_index("ix_control_commands_worker_state", "control_commands",
                    ["worker_id", "state"])


def _m003_job_timeout(op: Any) -> None:
    op.add_column("jobs", sa.Column("timeout_s", sa.Float))


def _m004_scheduling(op: Any) -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("submitter", sa.String(128), nullable=False,
                                    server_default="anonymous"))
    op.add_column("jobs", sa.Column("worker_label", sa.String(255)))
    op.add_column("jobs", sa.Column("num_gpus", sa.Integer, nullable=False, server_default="1"))
    op.add_column("jobs", sa.Column("memory_bytes", sa.BigInteger))
    op.add_column("jobs", sa.Column("claimed_at", sa.DateTime))
    op.create_index("ix_jobs_state_priority_id", "jobs", ["state", "priority", "id"])
    op.create_index("ix_jobs_submitter_claimed_at", "jobs", ["submitter", "claimed_at"])
    op.add_column("workers", sa.Column("labels", sa.JSON))
    op.add_column("workers", sa.Column("gpu_count", sa.Integer, nullable=False,
                                       server_default="0"))
    op.add_column("workers", sa.Column("gpus", sa.JSON))
    op.add_column("workers", sa.Column("gpu_free_bytes", sa.BigInteger))


def _m005_api_models(op: Any) -> None:
    op.add_column("jobs", sa.Column("api", sa.JSON))
    op.add_column("jobs", sa.Column("api_key_encrypted", sa.Text))


def _m006_unknown_memory(op: Any) -> None:
    # a GPU reading NVML cannot give (a container's PID namespace) is stored as NULL
    with op.batch_alter_table("memory_peaks") as batch:
        batch.alter_column("bytes", existing_type=sa.BigInteger, nullable=True)


def _m007_runtime_settings(op: Any) -> None:
    op.create_table(
        "runtime_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def _m008_data_parallel(op: Any) -> None:
    """A job spread over several workers: its shards are rows of `jobs`."""
    # No foreign key: SQLite adds one only by copying the table, and dropping the old
    # `jobs` would cascade into `samples`. delete_job removes a job's shards itself.
    op.add_column("jobs", sa.Column("parent_id", sa.Integer))
    op.add_column("jobs", sa.Column("shard_index", sa.Integer))
    op.add_column("jobs", sa.Column("shard_count", sa.Integer))
    op.create_index("ix_jobs_parent_id", "jobs", ["parent_id"])


def _m009_id_floors(op: Any) -> None:
    op.create_table(
        "id_floors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    # the floor starts at the highest job id there is: ids deleted before this
    # migration are beyond recall, those from now on are never handed out again
    op.execute("INSERT INTO id_floors (name, value) SELECT 'jobs', COALESCE(MAX(id), 0) "
               "FROM jobs")


def _m010_score_records(op: Any) -> None:
    """Every score's standard error and 95% interval; every job's run manifest."""
    with op.batch_alter_table("scores") as batch:
        batch.add_column(sa.Column("stderr", sa.Float))
        batch.add_column(sa.Column("ci_low", sa.Float))
        batch.add_column(sa.Column("ci_high", sa.Float))
    op.add_column("jobs", sa.Column("manifest", sa.JSON))


def _m011_gpu_reservations(op: Any) -> None:
    """What a claimed job will take on a GPU shared with other workers, counted
    as taken by the host's other workers on that GPU until the job ends."""
    op.add_column("workers", sa.Column("gpu_reserved", sa.JSON))


def _m012_own_memory(op: Any) -> None:
    """Each sample's RSS peak above its job's baseline, beside the process's.
    A job's own peaks are memory_peaks rows (`rss_baseline`, `rss_own_peak`), which need
    no new column; jobs run before have none and show the process's peak."""
    op.add_column("samples", sa.Column("peak_own_rss_bytes", sa.BigInteger))


def _m013_cluster_decisions(op: Any) -> None:
    """What the cluster controllers decided, for the Workers view."""
    op.create_table(
        "cluster_decisions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pool", sa.String(128), nullable=False),
        sa.Column("engine", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("queued", sa.Integer, nullable=False),
        sa.Column("busy", sa.Integer, nullable=False),
        sa.Column("placed", sa.Integer, nullable=False),
        sa.Column("started", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_index("ix_cluster_decisions_pool_id", "cluster_decisions", ["pool", "id"])


MIGRATIONS: list[Callable[[Any], None]] = [_m001_initial, _m002_manager_channel,
                                           _m003_job_timeout, _m004_scheduling,
                                           _m005_api_models, _m006_unknown_memory,
                                           _m007_runtime_settings, _m008_data_parallel,
                                           _m009_id_floors, _m010_score_records,
                                           _m011_gpu_reservations, _m012_own_memory,
                                           _m013_cluster_decisions]
