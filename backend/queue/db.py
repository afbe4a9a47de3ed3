"""Storage: SQLAlchemy 2 models, engine set-up and schema migrations.

The jobs table is the queue (see jobs.py). SQLite is the default engine and is
opened in WAL mode with a busy timeout, so the server and several workers can
read and write the same file at once. PostgreSQL (`postgresql+psycopg://…`) is
the engine for workers on several machines: there claims lock rows with
`FOR UPDATE SKIP LOCKED` instead of taking SQLite's database-wide write lock,
and new work is announced with NOTIFY (see notify.py).

The schema is an ordered list of small migrations (`migrations.MIGRATIONS`), each written
with Alembic's operations so it runs on SQLite and PostgreSQL alike; the number
of migrations applied is kept in `schema_version`. `init_db` applies what is
missing, so every process that opens the database brings it up to date.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Naive UTC timestamp (SQLite keeps no time zone; every stored time is UTC)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    # the queue's reads: a state's jobs newest first (list), and the claim's order
    # (priority, then round robin over submitters by their last claim, then id)
    __table_args__ = (sa.Index("ix_jobs_state_id", "state", "id"),
                      sa.Index("ix_jobs_state_priority_id", "state", "priority", "id"),
                      sa.Index("ix_jobs_submitter_claimed_at", "submitter", "claimed_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(1024))
    dataset: Mapped[str] = mapped_column(sa.String(128))
    params: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    state: Mapped[str] = mapped_column(sa.String(16), default=JobState.QUEUED.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(sa.String(128))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    progress_done: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(sa.Text)
    events: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON, default=list)
    timeout_s: Mapped[float | None] = mapped_column(sa.Float)
    priority: Mapped[int] = mapped_column(default=0)
    submitter: Mapped[str] = mapped_column(sa.String(128), default="anonymous")
    worker_label: Mapped[str | None] = mapped_column(sa.String(255))
    num_gpus: Mapped[int] = mapped_column(default=1)
    memory_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    """Estimated GPU memory the job needs (weights + KV cache + activations), if known."""
    api: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    """An `openai:` model's options without the key (ApiOptions.public())."""
    api_key_encrypted: Mapped[str | None] = mapped_column(sa.Text)
    """The job's API key as a Fernet token (secrets_box.py); never returned."""
    claimed_at: Mapped[datetime | None]
    """When a worker last claimed the job (round robin over submitters reads it)."""
    parent_id: Mapped[int | None] = mapped_column(index=True)
    """A shard of a data-parallel job: the job it belongs to (its samples are stored
    there). None for an ordinary job and for the data-parallel job itself."""
    shard_index: Mapped[int | None]
    """A shard's place: it evaluates the items whose idx % shard_count == shard_index."""
    shard_count: Mapped[int | None]
    """Shards of a data-parallel job (on the job and on each shard); None: not sharded."""
    manifest: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    """What the job ran with (backend.engine.manifest): versions, device, the model's and
    the task's identities, inference settings; written once its model is loaded."""

    samples: Mapped[list[Sample]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True,
        order_by="Sample.idx")
    scores: Mapped[list[Score]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True,
        order_by="Score.id")
    memory_peaks: Mapped[list[MemoryPeak]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True,
        order_by="MemoryPeak.id")


class Sample(Base):
    """One evaluated item of a job; (job_id, idx) is unique so nothing is stored twice."""

    __tablename__ = "samples"
    __table_args__ = (sa.UniqueConstraint("job_id", "idx", name="uq_samples_job_idx"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int]
    prompt: Mapped[str] = mapped_column(sa.Text)
    prompt_tokens: Mapped[int]
    prediction: Mapped[str] = mapped_column(sa.Text)
    score: Mapped[float | None] = mapped_column(sa.Float)
    latency_s: Mapped[float] = mapped_column(sa.Float)
    output_tokens: Mapped[int | None]
    peak_rss_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    """The worker process's peak resident memory while the sample ran."""
    peak_own_rss_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    """The same above the job's baseline (the memory_peaks row `rss_baseline`): what the
    job itself held; None on samples stored before it was measured."""
    peak_gpu_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    fields: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="samples")


class Score(Base):
    """A named score of a job: `overall`, or one entry of a breakdown (`cell`, `subset`…).

    `labels` says which part of the breakdown the value belongs to, e.g.
    {"context_length": 1024, "depth_percent": 50}.
    """

    __tablename__ = "scores"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[float] = mapped_column(sa.Float)
    count: Mapped[int] = mapped_column(default=0)
    labels: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    stderr: Mapped[float | None] = mapped_column(sa.Float)
    """The value's standard error; None where there is none (and on jobs scored before
    error bars were recorded)."""
    ci_low: Mapped[float | None] = mapped_column(sa.Float)
    ci_high: Mapped[float | None] = mapped_column(sa.Float)
    """The value's 95% interval."""

    job: Mapped[Job] = relationship(back_populates="scores")


class MemoryPeak(Base):
    """A memory reading of a job, in bytes: `rss_peak` (the worker process's), `rss_own_peak`
    (the job's own, above `rss_baseline`), `rss_at_load`, `cuda_max_allocated`…"""

    __tablename__ = "memory_peaks"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    device: Mapped[str] = mapped_column(sa.String(32), default="cpu")
    bytes: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    """None: unknown (NVML could not tell this process's GPU use)."""

    job: Mapped[Job] = relationship(back_populates="memory_peaks")


class IdFloor(Base):
    """The highest id a table ever handed out, where the engine may hand it out again:
    SQLite gives a new row max(id) + 1, so deleting the newest job would give its id to
    the next one (PostgreSQL's sequences never go back and need no floor)."""

    __tablename__ = "id_floors"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    value: Mapped[int] = mapped_column(sa.BigInteger)


class WorkerState(str, enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    STOPPED = "stopped"
    LOST = "lost"
    """It stopped heartbeating: marked by another worker, or shown so by the API."""


class WorkerRow(Base):
    """A worker process as it last reported itself."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    host: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int]
    device: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[str] = mapped_column(sa.String(16))
    current_job_id: Mapped[int | None]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    labels: Mapped[list[str] | None] = mapped_column(sa.JSON)
    gpu_count: Mapped[int] = mapped_column(default=0)
    gpus: Mapped[list[dict[str, Any]] | None] = mapped_column(sa.JSON)
    """Per GPU: index, name, total_bytes, free_bytes (and simulated: true for pretend GPUs)."""
    gpu_free_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    """GPU memory a job may use on this worker now (free, under LBS_GPU_MEMORY_LIMIT)."""
    gpu_reserved: Mapped[dict[str, int] | None] = mapped_column(sa.JSON)
    """Per NVML index (as text): GPU memory this worker's job will still take there that
    NVML does not show yet (all of it from the claim, the rest once its model loaded);
    the other workers of this host on that GPU count it as taken."""


class WorkerStatus(Base):
    """The latest status a worker published of its model manager (JSON)."""

    __tablename__ = "worker_status"

    worker_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    status: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class CommandState(str, enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class ControlCommand(Base):
    """A command for one worker's model manager (offload, release, pin…), and its answer."""

    __tablename__ = "control_commands"
    # a worker's pending commands (its worker_id prefix serves the worker's other reads)
    __table_args__ = (sa.Index("ix_control_commands_worker_state", "worker_id", "state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    worker_id: Mapped[str] = mapped_column(sa.String(128))
    command: Mapped[str] = mapped_column(sa.String(32))
    args: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    state: Mapped[str] = mapped_column(sa.String(16), default=CommandState.PENDING.value)
    result: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    done_at: Mapped[datetime | None]


class RuntimeSetting(Base):
    """A setting the operator changed at run time through the API (the GPU idle timeout,
    the memory limit): kept across restarts and applied by every worker as it starts."""

    __tablename__ = "runtime_settings"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(sa.JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ClusterDecision(Base):
    """One look of a cluster controller at the queue: what it saw and what it did."""

    __tablename__ = "cluster_decisions"
    __table_args__ = (sa.Index("ix_cluster_decisions_pool_id", "pool", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pool: Mapped[str] = mapped_column(sa.String(128))
    engine: Mapped[str] = mapped_column(sa.String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    queued: Mapped[int]
    """Queued jobs and shards a worker of the pool could run."""
    busy: Mapped[int]
    """The pool's live workers running a job."""
    placed: Mapped[int]
    """Workers the engine holds for the pool (starting, idle or busy)."""
    started: Mapped[int]
    """Workers asked for at this look."""
    message: Mapped[str] = mapped_column(sa.Text)


_MIGRATION_LOCK = 0x4C4253  # "LBS": the advisory lock key migrations take on PostgreSQL


def is_postgres(bind: Any) -> bool:
    """Whether an engine, connection or session talks to PostgreSQL."""
    bind = bind.get_bind() if isinstance(bind, Session) else bind
    return bind.dialect.name == "postgresql"


def _migrate(engine: Engine) -> None:
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    from backend.queue import migrations

    # The write lock is taken first, so two processes never migrate at once
    # (PostgreSQL: a transaction-scoped advisory lock; its DDL is transactional too).
    with _immediate(), engine.begin() as conn:
        if is_postgres(engine):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = conn.exec_driver_sql("SELECT MAX(version) FROM schema_version").scalar() or 0
        if current > len(migrations.MIGRATIONS):
            raise RuntimeError(
                f"database schema version {current} is newer than this code "
                f"({len(migrations.MIGRATIONS)}); upgrade LLM Bench Shower")
        op = Operations(MigrationContext.configure(conn))
        for version, migration in enumerate(migrations.MIGRATIONS[current:], start=current + 1):
            log.info("[DB] applying migration %d: %s", version, migration.__name__)
            migration(op)
            conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (:v)"),
                         {"v": version})


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is turned off so that the BEGIN
    # emitted below (and BEGIN IMMEDIATE in claims) is the one in force.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


_local = threading.local()


@contextmanager
def _immediate() -> Iterator[None]:
    previous = getattr(_local, "immediate", False)
    _local.immediate = True
    try:
        yield
    finally:
        _local.immediate = previous


def _sqlite_begin(conn: Any) -> None:
    # A transaction that reads and then writes must hold the write lock from
    # its start: a deferred one would fail with SQLITE_BUSY when another writer
    # committed in between, and busy_timeout cannot help with that.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if getattr(_local, "immediate", False) else "BEGIN")


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """One engine per URL per process, with the schema brought up to date."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create_engine(url)
            _migrate(engine)
            _engines[url] = engine
        return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        # a "file:…?uri=true" database is an SQLite URI: sqlite opens it, no folder to make
        if path and path != ":memory:" and not path.startswith("file:"):
            from pathlib import Path
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    parsed = sa.engine.make_url(url)
    if parsed.drivername == "postgresql":  # SQLAlchemy would pick psycopg2; we ship psycopg 3
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, pool_pre_ping=True)


def session_factory(url: str) -> sessionmaker:
    """A sessionmaker bound to the engine for `url` (objects stay usable after commit)."""
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def write_session(factory: sessionmaker) -> Iterator[Session]:
    """A session whose transaction takes the write lock at once and commits on exit.

    Use it for every read-then-write transaction (claims, lease renewals,
    finishing a job); plain `factory()` sessions are for reads and blind writes.
    On SQLite the transaction holds the database's write lock (BEGIN IMMEDIATE);
    PostgreSQL has no such lock, so the rows read there must be read with
    `with_for_update()` (see `jobs.py`).
    """
    with _immediate():
        session = factory()
        session.connection()  # begin now, while the flag is set
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Close every pooled connection (tests, and before a process forks)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
