"""The SQLite index of a cache directory: entries, shards, models, failures and runs.

The index is derived data (shards describe themselves); it exists so that lookups are fast.
It runs in WAL mode, so readers never block the single writer and never see partial state.
An entry row is committed only after its shard is durable on disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

from mmprep.version import __version__
from mmprep.errors import CacheVersionError, IndexUnreadableError, UsageError
from mmprep.faults import fault_point

if TYPE_CHECKING:  # shards need torch; the index (and `mmprep stats`, `gc`, ...) does not
    from mmprep.store.shards import WrittenShard

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: failures.depends_on (the settings a failure depended on)
LOOKUP_BATCH = 2048  # keys per lookup query (SQLite allows 32766 parameters)

# The columns every writer fills (`checked` is only set by refresh).
ENTRY_COLUMNS = "fingerprint, key, url, caller_id, shard, tensors, dtype, shape, content_sha256, etag, last_modified, run_id, created"
ENTRY_INSERT = f"INTO entries ({ENTRY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, family TEXT NOT NULL,
    info TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, run_id TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    fingerprint TEXT NOT NULL, key TEXT NOT NULL, url TEXT NOT NULL, caller_id TEXT,
    shard TEXT NOT NULL, tensors TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    content_sha256 TEXT NOT NULL, etag TEXT, last_modified TEXT,
    run_id TEXT NOT NULL, created REAL NOT NULL,
    checked REAL,  -- last time the source was re-validated by --refresh-older-than (NULL: never)
    PRIMARY KEY (fingerprint, key)) WITHOUT ROWID;
-- Covers the per-row "is it cached, and by which run" probe of every rerun: a table row is ~400 bytes,
-- this index's ~140, so a million-key rerun reads a third of the pages (BENCHMARKS.md, cached rerun).
CREATE INDEX IF NOT EXISTS entries_lookup ON entries (fingerprint, key, run_id);
CREATE INDEX IF NOT EXISTS entries_shard ON entries (shard);
CREATE INDEX IF NOT EXISTS entries_content ON entries (fingerprint, content_sha256);
CREATE TABLE IF NOT EXISTS failures (
    fingerprint TEXT NOT NULL, key TEXT NOT NULL, url TEXT, caller_id TEXT,
    source TEXT, line INTEGER, kind TEXT NOT NULL, message TEXT NOT NULL,
    status INTEGER, retryable INTEGER NOT NULL, attempts INTEGER NOT NULL,
    run_id TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    depends_on TEXT,  -- JSON of the settings the kind depends on when it was recorded (NULL: none, or unknown)
    PRIMARY KEY (fingerprint, key)) WITHOUT ROWID;
-- vLLM's identifier of the image bytes with this content sha256, for a server started with --model model_id
-- (`encode --vllm-model-id`; `export --format vllm-ec --key vllm` names store entries by it).
CREATE TABLE IF NOT EXISTS vllm_identifiers (
    content_sha256 TEXT NOT NULL, model_id TEXT NOT NULL, identifier TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (content_sha256, model_id)) WITHOUT ROWID;
-- vLLM's identifier -> entry, as the mmprep encoder-cache connector looks up a request that carries no uuid.
CREATE INDEX IF NOT EXISTS vllm_identifiers_by_id ON vllm_identifiers (identifier);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, model TEXT NOT NULL,
    started REAL NOT NULL, finished REAL, status TEXT NOT NULL, exit_code INTEGER,
    summary TEXT);
"""

# How an index of an older schema version becomes the next one: version -> statements (run in one transaction).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE failures ADD COLUMN depends_on TEXT",),  # old rows: NULL (unknown), so they are retried once
}

# The failures table's columns in table order (an index of schema 1 lacks the last one).
FAILURE_COLUMNS = (
    "fingerprint, key, url, caller_id, source, line, kind, message, status, retryable, attempts, run_id, "
    "first_seen, last_seen, depends_on"
)


@dataclass(frozen=True)
class FailureRecord:
    """One failed row, as stored in the index and in errors.jsonl."""

    key: str  # entry key, or "line:<sha256>" for a manifest line that had no URL
    url: str | None
    caller_id: str | None
    source: str | None
    line: int | None
    kind: str
    message: str
    retryable: bool
    attempts: int
    status: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "line": self.line,
            "url": self.url,
            "id": self.caller_id,
            "key": self.key,
            "kind": self.kind,
            "message": self.message,
            "status": self.status,
            "retryable": self.retryable,
            "attempts": self.attempts,
        }


class KeyState(NamedTuple):
    """What the index knows about one key for one model (a tuple: a million of them are built per cached rerun)."""

    cached: bool
    run_id: str | None  # run that encoded it, or that last failed it
    failed_kind: str | None = None
    failed_retryable: bool = False
    checked: float | None = None  # cached: when the source was last fetched or re-validated
    etag: str | None = None
    last_modified: str | None = None
    content_sha256: str | None = None
    failed_depends: str | None = None  # failed: the settings its kind depended on (JSON; None: none or unknown)
    failed_seen: float | None = None  # failed: when it last failed


def utc_iso(ts: float | None) -> str | None:
    """An index time (Unix seconds) as ISO 8601 in UTC, as `show` and `stats --json` print it; None stays None."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the index with the settings every connection needs (WAL, busy timeout); read-only: `open_readonly`."""
    if readonly:
        return open_readonly(path).conn
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    try:
        _configure(conn, path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("PRAGMA busy_timeout=30000")
    conn.row_factory = sqlite3.Row
    _check_schema_version(conn, path)  # first: refuse a corrupt or newer index before changing anything


# How a read-only connection reads the index (docs/cache.md#read-only-caches):
LIVE = "wal"  # in place, with its -wal and -shm: sees every commit whole and never blocks a writer
IMMUTABLE = "immutable"  # the index file alone (SQLite's immutable=1): no -wal/-shm could be opened, none holds commits
SNAPSHOT = "snapshot"  # a private copy of the index and its -wal, taken at open: the -wal holds commits it cannot open in place

_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_PERM, _SQLITE_IOERR = 8, 14, 3, 10
_SHM_IOERRS = frozenset({4618, 4874, 5130, 5386})  # SQLITE_IOERR_SHMOPEN, _SHMSIZE, _SHMLOCK, _SHMMAP


@dataclass
class ReadOnlyIndex:
    """A read-only connection to a cache's index, opened the way its file system allows (`open_readonly`).

    `mode` is LIVE, IMMUTABLE or SNAPSHOT. A LIVE connection follows the writer; the other two see the index
    as it was when opened, so a long-lived reader checks `changed()` and reopens.
    """

    path: Path
    conn: sqlite3.Connection
    mode: str
    stamp: tuple[Any, ...]

    def changed(self) -> bool:
        """Whether this connection no longer reads the index as it is: a new index was renamed over the old one
        (`mmprep index rebuild`), or, for a connection that is not LIVE, any of its files changed."""
        return _stamp(self.path, self.mode) != self.stamp

    def close(self) -> None:
        self.conn.close()


def open_readonly(path: Path | str) -> ReadOnlyIndex:
    """Open a cache's index read-only, also on a read-only mount or in a directory this user cannot write.

    In place first (LIVE). When SQLite cannot open the WAL there (no -shm it may use and none it may create),
    the index file is read alone as immutable when no -wal holds commits (exact: the file is the whole index),
    else a private copy of the index and its -wal is read (SNAPSHOT). Neither fallback sees later commits.
    """
    path = Path(path)
    uri = "file:" + quote(str(path.absolute()))
    stamp = _stamp(path, LIVE)
    try:
        return ReadOnlyIndex(path, _open_uri(f"{uri}?mode=ro", path), LIVE, stamp)
    except sqlite3.OperationalError as exc:
        if not _cannot_open_in_place(exc):
            raise
        in_place = exc
    wal = Path(f"{path}-wal")
    stamp = _stamp(path, IMMUTABLE)
    try:
        if _holds_frames(wal):
            try:
                return ReadOnlyIndex(path, _snapshot(path, wal), SNAPSHOT, stamp)
            except OSError as exc:  # the -wal is not readable, or no room for the copy: the index file alone
                log.warning("reading %s without its -wal (%s): commits not yet checkpointed are not seen", path, exc)
        return ReadOnlyIndex(path, _open_uri(f"{uri}?mode=ro&immutable=1", path), IMMUTABLE, stamp)
    except sqlite3.OperationalError as exc:
        raise UsageError(f"cannot read the index {path}: {in_place}; read as immutable: {exc}") from None


def _open_uri(uri: str, path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
    try:
        _configure(conn, path)  # the first read: SQLite opens the -wal and -shm here
    except BaseException:
        conn.close()
        raise
    return conn


def _cannot_open_in_place(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused a read-only open for want of write access (to the -shm, the -wal, the directory)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is None:
        return any(m in str(exc) for m in ("unable to open", "readonly database", "disk I/O error"))
    return code & 0xFF in (_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_PERM) or code in _SHM_IOERRS


def _holds_frames(wal: Path) -> bool:
    """Whether a -wal file may hold commits (more than its 32-byte header)."""
    try:
        return wal.stat().st_size > 32
    except OSError:
        return False


def _snapshot(path: Path, wal: Path) -> sqlite3.Connection:
    """Copy the index and its -wal to a private directory, let SQLite apply the -wal there, and read the copy
    as immutable; the directory is removed at once (the open connection keeps the file until it closes)."""
    with tempfile.TemporaryDirectory(prefix="mmprep-index-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        shutil.copyfile(wal, f"{copy}-wal")
        writable = sqlite3.connect(copy)
        try:
            writable.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every commit of the -wal into the copy
        finally:
            writable.close()
        return _open_uri("file:" + quote(str(copy)) + "?mode=ro&immutable=1", path)


def _stamp(path: Path, mode: str) -> tuple[Any, ...]:
    """What `ReadOnlyIndex.changed` compares: the index's (device, inode); not LIVE, also each file's size and mtime."""
    files = (path,) if mode == LIVE else (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
    stamp: list[Any] = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            stamp.append(None)
            continue
        stamp.append((st.st_dev, st.st_ino) if mode == LIVE else (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def _check_schema_version(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse, before any read or write, an index made by a newer mmprep: its tables may mean what this
    one does not know, and writing them the old way would corrupt them."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # a new, empty index
            return
        raise
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise IndexUnreadableError(
            f"{path} is not a readable index ({exc}); `mmprep index rebuild {path.parent}` recreates it from the shards"
        ) from None
    if row is not None and not (row[0].isdigit() and int(row[0]) <= SCHEMA_VERSION):
        raise CacheVersionError(
            f"{path} has index schema version {row[0]!r}; this mmprep ({__version__}) reads version "
            f"{SCHEMA_VERSION} and older: the cache was written by a newer mmprep, so upgrade mmprep"
        )


def _migrate(conn: sqlite3.Connection) -> None:
    """Stamp a new index with the current schema version, or bring an older one up to it in place
    (one transaction, under an immediate write lock, so two writers opening it at once migrate it once)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        else:
            for version in range(int(row[0]), SCHEMA_VERSION):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
            conn.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


NEVER_CREATED = (
    "was never created: it holds no table (the run that made it stopped before its first commit, e.g. on a full "
    "disk), so the cache holds no entry"
)


def index_created(conn: sqlite3.Connection) -> bool:
    """Whether the index has its tables; an empty file (a run stopped before its first commit) has none."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='entries'").fetchone() is not None


def failure_columns(conn: sqlite3.Connection) -> str:
    """FAILURE_COLUMNS as a SELECT list that also reads an index of schema 1 (opened read-only, not migrated)."""
    present = {r[1] for r in conn.execute("PRAGMA table_info(failures)")}
    return ", ".join(c if c in present else f"NULL AS {c}" for c in FAILURE_COLUMNS.split(", "))


class CacheIndex:
    """Read and write access to one cache directory's index. One instance per thread."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = connect(path, readonly=readonly)
        if not readonly:
            with self.conn:
                self.conn.executescript(_SCHEMA)
            _migrate(self.conn)

    def close(self) -> None:
        self.conn.close()

    # -- lookups ---------------------------------------------------------------------------

    def key_states(self, fingerprint: str, keys: Sequence[str], *, detail: bool = True) -> dict[str, KeyState]:
        """Batched lookup: the state of every key that is cached or has failed before.

        Without `detail`, a cached key's state carries only its run_id (what a rerun without refresh
        needs), read from the narrow `entries_lookup` index and shared by all keys of one run.
        Each query returns its whole answer as one JSON row: stepping through rows one by one
        releases and re-takes the GIL per row, which any other busy Python thread (decode workers,
        the event loop) turns into a wait of up to a switch interval each; one step per batch avoids that.
        """
        states: dict[str, KeyState] = {}
        by_run: dict[str, KeyState] = {}
        for start in range(0, len(keys), LOOKUP_BATCH):
            chunk = keys[start : start + LOOKUP_BATCH]
            marks = ",".join("?" * len(chunk))
            params = (fingerprint, *chunk)
            for key, kind, retryable, run_id, depends_on, last_seen in self._json_rows(
                "key, kind, retryable, run_id, depends_on, printf('%!.17g', last_seen)",
                f"failures WHERE fingerprint=? AND key IN ({marks})",
                params,
            ):
                states[key] = KeyState(
                    False, run_id, kind, bool(retryable), failed_depends=depends_on, failed_seen=float(last_seen)
                )
            where = f"entries WHERE fingerprint=? AND key IN ({marks})"
            if not detail:
                for key, run_id in self._json_rows("key, run_id", where, params):
                    state = by_run.get(run_id)
                    if state is None:
                        state = by_run[run_id] = KeyState(True, run_id)
                    states[key] = state
                continue
            for key, run_id, checked, etag, last_modified, content_sha256 in self._json_rows(
                "key, run_id, printf('%!.17g', coalesce(checked, created)), etag, last_modified, content_sha256",
                where,
                params,
            ):
                states[key] = KeyState(True, run_id, None, False, float(checked), etag, last_modified, content_sha256)
        return states

    def _json_rows(self, columns: str, source: str, params: Sequence[Any]) -> list[list[Any]]:
        """`SELECT columns FROM source` as lists, fetched as one JSON array in a single step (floats as text: exact)."""
        sql = f"SELECT coalesce(json_group_array(json_array({columns})), '[]') FROM {source}"
        (blob,) = self.conn.execute(sql, params).fetchone()
        return json.loads(blob)

    def key_with_content(self, fingerprint: str, content_sha256: str) -> str | None:
        """A key of this model whose image bytes have this sha256 (content dedup), if any."""
        row = self.conn.execute(
            "SELECT key FROM entries WHERE fingerprint=? AND content_sha256=? LIMIT 1", (fingerprint, content_sha256)
        ).fetchone()
        return None if row is None else row[0]

    def has_vllm_identifier(self, fingerprint: str, key: str, model_id: str) -> bool:
        """Whether the cached entry `key` has its vLLM identifier for `model_id` recorded (for its current bytes)."""
        try:
            row = self.conn.execute(
                "SELECT 1 FROM entries e JOIN vllm_identifiers v ON v.content_sha256 = e.content_sha256 "
                "WHERE e.fingerprint=? AND e.key=? AND v.model_id=?",
                (fingerprint, key, model_id),
            ).fetchone()
        except sqlite3.OperationalError as exc:  # an index made before the table existed, opened read-only
            if "no such table" in str(exc):
                return False
            raise
        return row is not None

    def models(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM models ORDER BY created"))

    def decode_variants(self, fingerprint: str, base_fingerprint: str) -> list[tuple[dict[str, Any], int]]:
        """The other decode variants of one model in this cache (same `base_fingerprint`, another
        fingerprint) that hold entries: (their recorded decode options, entries)."""
        variants = []
        for row in self.models():
            info = json.loads(row["info"])
            if row["fingerprint"] == fingerprint or base_fingerprint not in (
                row["fingerprint"],
                info.get("base_fingerprint"),
            ):
                continue
            (count,) = self.conn.execute(
                "SELECT COUNT(*) FROM entries WHERE fingerprint=?", (row["fingerprint"],)
            ).fetchone()
            if count:
                variants.append((info.get("decode") or {}, count))
        return variants

    def entry(self, fingerprint: str, key: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM entries WHERE fingerprint=? AND key=?", (fingerprint, key)).fetchone()

    # -- writes (one writer thread) --------------------------------------------------------

    def register_model(self, fingerprint: str, name: str, family: str, info: dict[str, Any]) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?)",
                (fingerprint, name, family, json.dumps(info, default=str, sort_keys=True), time.time()),
            )

    def start_run(self, run_id: str, fingerprint: str, model: str) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO runs (run_id, fingerprint, model, started, status) VALUES (?, ?, ?, ?, 'running')",
                (run_id, fingerprint, model, time.time()),
            )

    def finish_run(self, run_id: str, status: str, exit_code: int, summary: dict[str, Any]) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE runs SET finished=?, status=?, exit_code=?, summary=? WHERE run_id=?",
                (time.time(), status, exit_code, json.dumps(summary, sort_keys=True), run_id),
            )

    def commit_shard(self, shard: WrittenShard, fingerprint: str, run_id: str) -> None:
        """Index a durable shard's entries in one transaction; healed failures are dropped."""
        self.commit_rows(
            shard.name, fingerprint, run_id, shard.nbytes, shard.sha256, entry_rows(shard, fingerprint, run_id)
        )

    def commit_rows(
        self, name: str, fingerprint: str, run_id: str, nbytes: int, sha256: str, rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """`commit_shard` from a shard's description (its `entry_rows`), for a shard another process wrote."""
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, fingerprint, len(rows), nbytes, sha256, run_id, time.time()),
            )
            self.conn.executemany("INSERT OR REPLACE " + ENTRY_INSERT, rows)
            fault_point("in_index_commit")
            self.conn.executemany(
                "DELETE FROM failures WHERE fingerprint=? AND key=?", [(fingerprint, r[1]) for r in rows]
            )

    def mark_checked(self, fingerprint: str, checks: Iterable[tuple[str, str | None, str | None]]) -> None:
        """Record that these (key, etag, last_modified) sources were re-validated unchanged just now."""
        now = time.time()
        with self.conn:
            self.conn.executemany(
                "UPDATE entries SET checked=?, etag=coalesce(?, etag), last_modified=coalesce(?, last_modified) "
                "WHERE fingerprint=? AND key=?",
                [(now, etag, lm, fingerprint, key) for key, etag, lm in checks],
            )

    def record_failures(
        self, fingerprint: str, run_id: str, failures: Sequence[FailureRecord], depends: Mapping[str, str] | None = None
    ) -> int:
        """Upsert the latest failure of each key; `attempts` accumulates across runs. `depends` maps a kind to the
        settings it depended on in this run (JSON), stored with the failure. Returns how many failures are new:
        the key had not failed before, or failed in another way (another kind)."""
        now = time.time()
        depends = depends or {}
        rows = [
            (
                fingerprint,
                f.key,
                f.url,
                f.caller_id,
                f.source,
                f.line,
                f.kind,
                f.message,
                f.status,
                int(f.retryable),
                f.attempts,
                run_id,
                now,
                now,
                depends.get(f.kind),
            )
            for f in failures
        ]
        with self.conn:
            before: dict[str, str] = {}
            for start in range(0, len(failures), LOOKUP_BATCH):
                keys = [f.key for f in failures[start : start + LOOKUP_BATCH]]
                before.update(self.conn.execute(
                    f"SELECT key, kind FROM failures WHERE fingerprint=? AND key IN ({','.join('?' * len(keys))})",
                    (fingerprint, *keys),
                ).fetchall())  # fmt: skip
            self.conn.executemany(
                f"""INSERT INTO failures ({FAILURE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT (fingerprint, key) DO UPDATE SET
                     url=excluded.url, caller_id=excluded.caller_id, source=excluded.source,
                     line=excluded.line, kind=excluded.kind, message=excluded.message,
                     status=excluded.status, retryable=excluded.retryable,
                     attempts=failures.attempts + excluded.attempts,
                     run_id=excluded.run_id, last_seen=excluded.last_seen, depends_on=excluded.depends_on""",
                rows,
            )
        return sum(before.get(f.key) != f.kind for f in failures)

    def record_vllm_identifiers(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Store (content_sha256, model_id, identifier) rows; the identifier depends on nothing else."""
        now = time.time()
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO vllm_identifiers VALUES (?, ?, ?, ?)", [(*r, now) for r in rows]
            )


def entry_rows(shard: WrittenShard, fingerprint: str, run_id: str) -> list[tuple[Any, ...]]:
    """The `entries` table rows (ENTRY_INSERT order) of a written shard."""
    return [
        (
            fingerprint,
            e.key,
            e.url,
            e.caller_id,
            shard.name,
            json.dumps(e.tensor_names),
            str(e.embeddings.dtype).removeprefix("torch."),
            json.dumps(list(e.embeddings.shape)),
            e.content_sha256,
            e.etag,
            e.last_modified,
            run_id,
            e.created,
        )
        for e in shard.entries
    ]
