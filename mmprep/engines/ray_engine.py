"""`mmprep encode --engine ray`: the same run as the local engine, spread over a Ray cluster.

  driver      manifest → skip what is cached (the EncodePlanner, as in the local engine: one index query per chunk)
              → the rows to load, as JSONL files under the cache dir (every node sees it)
  CPU tasks   map_batches(load_rows): fetch (our Fetcher, one event loop per task; conditional for a
              --refresh-older-than re-validation) → decode → preprocess
  actor pool  map_batches(EncodeActor): one model per actor (one per GPU, or CPU actors), batched
              forward, shards written under the cache dir; returns shard *descriptions*, never tensors
  driver      commits each described shard, records failures and re-validated entries (the CacheWriter,
              as in the local engine): the only SQLite writer

The cache dir must be on a file system every node shares. An encoder actor that dies is restarted by
Ray and its batch retried, up to `worker_restarts` times; a shard it wrote but never reported is
adopted (and deduplicated) at the end. Past that (a batch that kills every actor, say by running it
out of memory) the run stops as "failed" (exit 70) instead of retrying forever; what it committed stays.

The actors and the loading tasks are sized to the cluster's CPUs and GPUs (`size_pipeline`): actors
that would hold every CPU would leave the loading tasks waiting forever; what cannot fit is refused at
start. SIGINT/SIGTERM set a flag that the driver polls while it waits on Ray (the model loading, the
results), so a run stops within a poll, commits nothing more and shuts down the Ray it started. Ray
prints notices on sys.stdout from a thread of its own: stdout is redirected to stderr for as long as
that Ray is up, so that `--json` stdout is the summary alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import queue
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mmprep.imaging.decode import decode_image, pixel_options
from mmprep.errors import CacheWriteError, ErrorKind, RowError, UsageError
from mmprep.faults import fault_point
from mmprep.fetch import Fetched, Fetcher
from mmprep.manifest import Record, read_manifests
from mmprep.models import ImagePreprocessor, load_encoder, load_preprocessor
from mmprep.pipeline.batches import Encoded, Failed, Prepared, encode_batch, entry_of
from mmprep.pipeline.core import MANIFEST_CHUNK, RunCounters, chunked, exit_status, failure_of, new_run_id
from mmprep.pipeline.planner import EncodePlanner
from mmprep.pipeline.retry import FailurePolicy
from mmprep.pipeline.writer import CacheWriter, RunSummary, cache_write_message, other_decode_message, summarize
from mmprep.settings import RAY_WORKER_RESTARTS, LoadSettings, ModelSettings, Settings
from mmprep.store.index import FailureRecord, entry_rows
from mmprep.store.layout import CacheLayout
from mmprep.store.lock import WriterLock
from mmprep.store.shards import ShardWriter

LOAD_ROWS = 64  # rows per CPU task (fetched concurrently inside it)
ENCODE_ROWS = 256  # rows per actor call; the actor runs forwards of --batch-size over them
TODO_FILE_ROWS = 100_000  # rows per planned-work file
WORKDIR_PREFIX = ".ray-"  # <cache>/.ray-<run_id>/: the planned rows of a run, removed at its end
FORWARDED_ENV = ("MMPREP_", "HF_", "TRANSFORMERS_")  # driver environment the workers need too
MIN_ACTOR_CPUS = 0.25  # the smallest CPU share an encoder actor is sized down to on a small cluster
STOP_POLL = 0.2  # seconds between the driver's looks at the stop flag while it waits on Ray


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the driver needs of the model; the weights stay on the workers."""

    name: str
    fingerprint: str
    family: str
    description: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Sizing:
    """How many encoder actors, and the CPUs each actor and each loading task asks Ray for."""

    workers: int
    actor_cpus: float
    load_cpus: float


def size_pipeline(resources: Mapping[str, float], workers: int | None, gpus_per_worker: float) -> Sizing:
    """Fit the encoder actors and at least one loading task into the cluster's CPUs and GPUs (Ray's
    logical resources); UsageError when they cannot fit, instead of a pipeline that waits forever for a
    CPU its own actors hold. An actor asks for one CPU, a loading task for one, while they fit; on a
    smaller cluster both ask for a share (an actor at least MIN_ACTOR_CPUS)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if gpus_per_worker:
        fit = int(gpus / gpus_per_worker + 1e-9)
        if fit < 1:
            raise UsageError(f"--gpus-per-worker {gpus_per_worker:g} needs GPUs, and the Ray cluster has {gpus:g}; "
                             "pass --gpus-per-worker 0 for CPU encoder actors")  # fmt: skip
        if workers is not None and workers > fit:
            raise UsageError(f"--workers {workers} with --gpus-per-worker {gpus_per_worker:g} needs "
                             f"{workers * gpus_per_worker:g} GPUs, and the Ray cluster has {gpus:g}: "
                             f"use --workers {fit} or fewer")  # fmt: skip
        workers = fit if workers is None else workers
    workers = 1 if workers is None else workers
    load_cpus, actor_cpus = _cpu_shares(cpus, workers)
    if actor_cpus < MIN_ACTOR_CPUS:
        most = 0
        while _cpu_shares(cpus, most + 1)[1] >= MIN_ACTOR_CPUS:
            most += 1
        if most == 0:
            raise UsageError(f"the Ray cluster has {cpus:g} CPUs: too few for an encoder actor "
                             f"({MIN_ACTOR_CPUS:g} CPU at least) and the loading tasks")  # fmt: skip
        raise UsageError(f"--workers {workers} encoder actors and the loading tasks do not fit in the Ray cluster's "
                         f"{cpus:g} CPUs (an actor needs {MIN_ACTOR_CPUS:g} CPU at least): use --workers {most} "
                         "or fewer")  # fmt: skip
    return Sizing(workers, actor_cpus, load_cpus)


def _cpu_shares(cpus: float, workers: int) -> tuple[float, float]:
    """(a loading task's CPUs, an actor's CPUs): one each while they fit, else equal shares; rounded down
    to Ray's resource precision so that they never add up to more than the cluster has."""
    load = min(1.0, cpus / (workers + 1))
    actor = min(1.0, (cpus - load) / workers)
    return math.floor(load * 1e4) / 1e4, math.floor(actor * 1e4) / 1e4


class StopFlag:
    """The first SIGINT or SIGTERM of a Ray run; set by the signal handlers, read by the driver's loops."""

    def __init__(self, reporter: Any = None) -> None:
        self.signum: int | None = None
        self.reporter = reporter

    def set(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            if self.reporter is not None:
                self.reporter.note("stopping: committing what the workers reported and shutting them down…")

    @contextlib.contextmanager
    def catching(self) -> Iterator[Callable[[], None]]:
        """SIGINT and SIGTERM set the flag while inside (main thread only); yields a function that puts
        the handlers back in place (ray.init replaces the driver's SIGTERM handler)."""
        if threading.current_thread() is not threading.main_thread():
            yield lambda: None
            return
        signums = (signal.SIGINT, signal.SIGTERM)

        def install() -> None:
            for signum in signums:
                signal.signal(signum, lambda got, _frame: self.set(got))

        before = {signum: signal.getsignal(signum) for signum in signums}
        install()
        try:
            yield install
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)

    def wait(self, ref: Any) -> Any:
        """ray.get(ref), unless a signal comes first (then None)."""
        import ray

        while self.signum is None:
            ready, _ = ray.wait([ref], timeout=STOP_POLL)
            if ready:
                return ray.get(ready[0])
        return None


def run_ray(
    manifests: list[str], settings: Settings, *, address: str | None = None, workers: int | None = None,
    gpus_per_worker: float = 0, worker_restarts: int = RAY_WORKER_RESTARTS, reporter: Any = None,
    lock: WriterLock | None = None,
) -> RunSummary:  # fmt: skip
    """Run `mmprep encode` as a Ray Data pipeline on the cluster at `address` (None: RAY_ADDRESS or a local Ray);
    `lock`: the cache's writer lock when the caller took it already. A Ray this call starts (or joins) is
    shut down before it returns: its workers stop, and Ray prints nothing after the summary."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UsageError("--engine ray needs Ray Data: pip install 'mmprep[ray]'") from exc
    stop = StopFlag(reporter)
    owned = not ray.is_initialized()
    # Ray prints notices (its "(raylet)" lines among them) on sys.stdout from a thread of its own: --json owns stdout
    with contextlib.redirect_stdout(sys.stderr), stop.catching() as reinstall:
        try:
            if owned:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
                reinstall()
            sizing = size_pipeline(ray.cluster_resources(), workers, gpus_per_worker)
            remote_args: dict[str, Any] = {"runtime_env": {"env_vars": _forwarded_env()}}
            describe = ray.remote(_describe_model).options(num_cpus=sizing.actor_cpus, num_gpus=gpus_per_worker,
                                                           **remote_args)  # fmt: skip
            facts = stop.wait(describe.remote(settings.model, pixel_options(settings.load)))
            if facts is None:  # stopped while the model loaded: nothing was written
                return _interrupted_before_start(settings, stop.signum)
            return RayEncodeRun(manifests, settings, facts, reporter, sizing, gpus_per_worker, worker_restarts,
                                remote_args, lock, stop).run()  # fmt: skip
        finally:
            if owned:
                ray.shutdown()  # stops this run's tasks and actors, and Ray's notice thread (inside the redirect)


def _interrupted_before_start(settings: Settings, signum: int | None) -> RunSummary:
    """The summary of a run stopped before its model was known (nothing written to the cache)."""
    status, code = exit_status(None, signum, False)
    return summarize(RunCounters(), run_id=new_run_id(), model=settings.model.name, fingerprint="", status=status,
                     exit_code=code, layout=CacheLayout(settings.out), error=None, other_decodes=[])  # fmt: skip


class RayEncodeRun:
    """One encode run on Ray: the EncodePlanner plans the rows into files, Ray loads and encodes them, and
    the CacheWriter commits what comes back (the same planner and writer as the local engine's)."""

    def __init__(
        self, manifests: list[str], settings: Settings, facts: ModelFacts, reporter: Any, sizing: Sizing,
        gpus_per_worker: float, worker_restarts: int, remote_args: dict[str, Any], lock: WriterLock | None = None,
        stop: StopFlag | None = None,
    ) -> None:  # fmt: skip
        """`stop`: set by SIGINT/SIGTERM (run_ray catches them from before Ray starts)."""
        self.manifests = manifests
        self.settings = settings
        self.facts = facts
        self.reporter = reporter
        self.sizing = sizing
        self.gpus_per_worker = gpus_per_worker
        self.worker_restarts = worker_restarts
        self.remote_args = remote_args
        self.lock = lock
        self.run_id = new_run_id()
        self.counters = RunCounters()
        self.stop = stop or StopFlag(reporter)
        self.run_error: str | None = None  # set when the run gives up before its end (exit 70)
        self.other_decodes: list[dict[str, Any]] = []
        self.layout = CacheLayout(settings.out)
        self.workdir = self.layout.root / f"{WORKDIR_PREFIX}{self.run_id}"
        self.failures = FailurePolicy(settings.load, settings.retry_permanent_after)
        # the driver is the only index writer; every row is planned before any is committed: nothing to release
        self.writer = CacheWriter(self.layout, facts.fingerprint, facts.name, self.run_id, self.counters,
                                  self.failures.depends)  # fmt: skip

    def run(self) -> RunSummary:
        """Run to completion (or until SIGINT/SIGTERM), commit what the workers report, return the summary."""
        held = self.lock is not None and self.lock.held
        locked = contextlib.nullcontext() if held else WriterLock(self.layout.root, wait=self.settings.wait_lock)
        with locked, self.stop.catching():  # Ctrl-C / SIGTERM: stop, keep what is committed
            try:
                return self._run_locked()
            except (OSError, sqlite3.Error) as exc:  # a full disk at start-up (later, the run ends as failed)
                raise CacheWriteError(cache_write_message(exc)) from exc

    @property
    def stop_signal(self) -> int | None:
        """SIGINT or SIGTERM once the run was told to stop: it stops planning and committing within a
        poll; what is committed stays, and a rerun picks up the rest."""
        return self.stop.signum

    def _run_locked(self) -> RunSummary:
        for stale in self.layout.root.glob(WORKDIR_PREFIX + "*"):  # a crashed driver's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        with contextlib.ExitStack() as cleanup:  # closed in reverse order, whatever happens
            planned = PlannedKeys()
            cleanup.callback(planned.close)
            writer = self.writer.begin()  # adopts a crashed run's written-but-unindexed shards
            cleanup.callback(writer.close)
            planner = EncodePlanner(self.settings, self.layout, self.facts.fingerprint, self.run_id, self.counters,
                                    planned)  # fmt: skip
            cleanup.callback(planner.close)
            cleanup.callback(shutil.rmtree, self.workdir, ignore_errors=True)
            if self.reporter is not None:
                self.reporter.start(self.counters, self.manifests)
                cleanup.callback(self.reporter.stop, self.counters)
            f = self.facts
            writer.register_model(f.family, f.description)
            self.other_decodes = writer.other_decodes(str(f.description.get("base_fingerprint", f.fingerprint)))
            if self.reporter is not None:
                for other in self.other_decodes:
                    self.reporter.note(other_decode_message(other, self.settings.load))
            planner.open()
            todo = self._plan_rows(planner)
            if todo and self.stop_signal is None:
                self._run_pipeline(todo)
            if self.stop_signal is None:  # (after a stop, workers may still be writing: the next run adopts theirs)
                writer.adopt_orphans()  # shards of workers that died before reporting them
        return self._finish()

    def _plan_rows(self, planner: EncodePlanner) -> list[str]:
        """Plan the manifests chunk by chunk; write the rows to load into JSONL files; return their paths."""
        self.workdir.mkdir()
        paths: list[str] = []
        todo, in_file = None, 0
        try:
            records = read_manifests(self.manifests, self.settings.load.manifest)
            with contextlib.closing(chunked(records, MANIFEST_CHUNK)) as chunks:
                for chunk in chunks:
                    if self.stop_signal is not None:
                        break
                    work = planner.plan_chunk(chunk)
                    for failure in work.bad_lines:
                        self.writer.failed(failure)
                    for record, key, plan in work.loads:
                        if todo is None or in_file >= TODO_FILE_ROWS:
                            if todo is not None:
                                todo.close()
                            paths.append(str(self.workdir / f"todo-{len(paths):05d}.jsonl"))
                            todo, in_file = open(paths[-1], "w", encoding="utf-8"), 0
                        line = {"key": key, **record._asdict()}
                        if plan.refresh:  # the cached entry's validators and content hash
                            line["plan"] = [plan.etag, plan.last_modified, plan.content_sha256]
                        todo.write(json.dumps(line) + "\n")
                        in_file += 1
                    self.writer.flush()
                else:
                    self.counters.manifests_read = True
        finally:
            if todo is not None:
                todo.close()
        return paths

    def _run_pipeline(self, todo: list[str]) -> None:
        """Stream the planned rows through the CPU tasks and the actor pool; commit what comes back."""
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = self.settings.progress == "bar"
        s = self.settings
        size = self.sizing
        dataset = ray.data.read_text(todo, num_cpus=size.load_cpus).map_batches(
            load_rows, fn_kwargs={"load": s.load, "model": s.model}, batch_size=LOAD_ROWS, batch_format="pyarrow",
            num_cpus=size.load_cpus, **self.remote_args,
        ).map_batches(
            EncodeActor,
            fn_constructor_kwargs={
                "model": s.model, "decode_options": pixel_options(s.load), "out": str(self.layout.root),
                "fingerprint": self.facts.fingerprint,
                "run_id": self.run_id, "shard_bytes": s.shard_bytes,
            },
            batch_size=ENCODE_ROWS, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size.workers),
            num_cpus=size.actor_cpus, num_gpus=self.gpus_per_worker, max_restarts=self.worker_restarts,
            max_task_retries=self.worker_restarts, **self.remote_args,
        )  # fmt: skip
        try:
            self._commit_results(dataset)
        except ray.exceptions.RayError as exc:  # an actor died past worker_restarts, or a load task past Ray's retries
            self.run_error = (
                f"the Ray pipeline failed (after up to {self.worker_restarts} restarts): {_first_line(exc)}"
            )
        except (OSError, sqlite3.Error) as exc:  # the driver cannot write the index: disk full, I/O error, ...
            self.run_error = cache_write_message(exc)

    def _commit_results(self, dataset: Any) -> None:
        """Commit each shard the actors describe, record each failure and each refresh that kept its
        entry, as the results stream in."""
        writer = self.writer
        for batch in self._results(dataset):
            for out in batch.to_pylist():
                self.counters.bytes_fetched += out["bytes_fetched"]
                if out["failure"] is not None:
                    writer.failed(FailureRecord(**json.loads(out["failure"])))
                if out["checked"] is not None:
                    writer.checked(*json.loads(out["checked"]))
                if out["shard"] is not None:
                    shard = json.loads(out["shard"])
                    rows = [tuple(r) for r in shard["rows"]]
                    writer.commit_rows(shard["name"], shard["nbytes"], shard["sha256"], rows)
                    self.counters.encoded += len(rows)  # the driver learns of encoded rows with their commit
            writer.flush()
            if self.stop_signal is not None:
                break  # what is committed stays; the rest is picked up by a rerun

    def _results(self, dataset: Any) -> Iterator[Any]:
        """The pipeline's result batches, read by a helper thread so that a signal stops the driver
        within STOP_POLL seconds even while Ray has nothing to give; errors are raised here."""
        results: queue.Queue[Any] = queue.Queue(maxsize=2)
        done = object()

        def read() -> None:
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    while True:
                        if self.stop_signal is not None:
                            return  # leaving the iterator shuts the pipeline down
                        try:
                            results.put(batch, timeout=STOP_POLL)
                            break
                        except queue.Full:
                            pass
                results.put(done)
            except BaseException as exc:  # handed to the driver
                results.put(exc)

        threading.Thread(target=read, name="mmprep-ray-results", daemon=True).start()
        while self.stop_signal is None:
            try:
                item = results.get(timeout=STOP_POLL)
            except queue.Empty:
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _finish(self) -> RunSummary:
        status, code = exit_status(self.run_error, self.stop_signal, self.counters.new_failures > 0)
        f = self.facts
        summary = summarize(
            self.counters, run_id=self.run_id, model=f.name, fingerprint=f.fingerprint, status=status, exit_code=code,
            layout=self.layout, error=self.run_error, other_decodes=self.other_decodes,
        )  # fmt: skip
        self.writer.finish(summary)
        return summary


class PlannedKeys:
    """The keys a Ray driver has planned in this run, in a temporary SQLite file: memory stays flat
    however long the manifest is (a set of 100M hex keys would take ~15 GB)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="mmprep-planned-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "keys.sqlite"), isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE planned (key BLOB PRIMARY KEY) WITHOUT ROWID; BEGIN;"  # one transaction: never committed
        )

        self.lock = threading.Lock()  # the Claims protocol's; one thread (the driver's) plans

    def claim(self, key: str) -> bool:
        """Record `key`; False when it was planned before."""
        return self._db.execute("INSERT OR IGNORE INTO planned VALUES (?)", (bytes.fromhex(key),)).rowcount == 1

    def held(self, keys: list[str | None]) -> list[bool]:
        """Whether each key was planned already (one query)."""
        wanted = [bytes.fromhex(key) for key in keys if key is not None]
        if not wanted:
            return [False] * len(keys)
        marks = ",".join("?" * len(wanted))
        found = {row[0].hex() for row in self._db.execute(f"SELECT key FROM planned WHERE key IN ({marks})", wanted)}
        return [key is not None and key in found for key in keys]

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


# -- CPU tasks --------------------------------------------------------------------------------------


def load_rows(batch: Any, load: LoadSettings, model: ModelSettings) -> Any:
    """Fetch, decode and preprocess a batch of planned rows (a pyarrow table of JSON lines)."""
    import pyarrow as pa

    preprocess = _preprocessor(model)
    if load.fast_decode and load.draft_size is None:
        load = dataclasses.replace(load, draft_size=preprocess.input_size())
    rows = [json.loads(text) for text in batch.column("text").to_pylist()]
    plans = [row.pop("plan", None) for row in rows]  # a refresh: [etag, last_modified, content_sha256]
    requests = [(row["url"], *(plan[:2] if plan else (None, None))) for row, plan in zip(rows, plans)]
    out = []
    for row, plan, fetched in zip(rows, plans, asyncio.run(_fetch_all(requests, load))):
        key = row.pop("key")
        record = Record(**row)
        loaded = {"key": key, "record": json.dumps(row), "inputs": None, "content_sha256": None, "etag": None,
                  "last_modified": None, "failure": None, "bytes_fetched": 0, "checked": False}  # fmt: skip
        try:
            if isinstance(fetched, RowError):
                raise fetched
            if fetched is None:  # 304 to a refresh's conditional request: the entry stands
                loaded["checked"] = True
                out.append(loaded)
                continue
            sha = hashlib.sha256(fetched.data).hexdigest()
            loaded.update(bytes_fetched=len(fetched.data), etag=fetched.etag, last_modified=fetched.last_modified,
                          content_sha256=sha)  # fmt: skip
            if plan is not None and sha == plan[2]:  # a refresh found the same bytes: the entry stands
                loaded["checked"] = True
                out.append(loaded)
                continue
            inputs = preprocess(decode_image(fetched.data, load))
            loaded["inputs"] = _pickle(inputs)
        except RowError as exc:
            loaded["failure"] = _failure_json(failure_of(record, key, exc))
        except Exception as exc:  # a bug: record it, keep the run going (as the local engine does)
            error = RowError(ErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            loaded["failure"] = _failure_json(failure_of(record, key, error))
        out.append(loaded)
    return pa.Table.from_pylist(out, schema=_loaded_schema())


Request = tuple[str, str | None, str | None]  # url, and the ETag / Last-Modified of a conditional refresh


async def _fetch_all(requests: list[Request], load: LoadSettings) -> list[Fetched | RowError | None]:
    """Fetch every request with one Fetcher, at most `load.concurrency` at once; None where a
    conditional request was answered 304."""
    slots = asyncio.Semaphore(load.concurrency)

    async def one(fetcher: Fetcher, url: str, etag: str | None, last_modified: str | None) -> Fetched | RowError | None:
        async with slots:
            try:
                return await fetcher.fetch(url, etag=etag, last_modified=last_modified)
            except RowError as exc:
                return exc
            except Exception as exc:
                return RowError(ErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    async with Fetcher(load) as fetcher:
        return list(await asyncio.gather(*(one(fetcher, *request) for request in requests)))


@functools.lru_cache(maxsize=4)
def _preprocessor(model: ModelSettings) -> ImagePreprocessor:
    """The model's image processor, loaded once per worker process (no weights)."""
    return load_preprocessor(model)


# -- actors -----------------------------------------------------------------------------------------


class EncodeActor:
    """Holds one model; encodes the loaded rows and writes them as shards under the cache dir."""

    def __init__(
        self,
        model: ModelSettings,
        decode_options: dict[str, object],
        out: str,
        fingerprint: str,
        run_id: str,
        shard_bytes: int,
    ) -> None:
        self.encoder = load_encoder(model, decode_options)
        if self.encoder.fingerprint != fingerprint:
            raise UsageError(f"this worker's model has fingerprint {self.encoder.fingerprint}, not {fingerprint} "
                             "(workers with different hardware or software?)")  # fmt: skip
        self.run_id = run_id
        self.batch_size = model.batch_size
        self.shard_bytes = shard_bytes
        # one writer per actor, under a name of its own: shard names never collide across actors
        self.shards = ShardWriter(
            CacheLayout(Path(out)),
            fingerprint,
            self.encoder.name,
            f"{run_id}-{uuid.uuid4().hex[:6]}",
            self.encoder.family,
        )

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out: list[dict[str, Any]] = []
        ready: list[tuple[Prepared, int]] = []
        for row in batch.to_pylist():
            if row["failure"] is not None:
                out.append(_result(failure=row["failure"], bytes_fetched=row["bytes_fetched"]))
                continue
            if row["checked"]:  # a refresh that kept the entry: the driver marks it checked
                checked = json.dumps([row["key"], row["etag"], row["last_modified"]])
                out.append(_result(checked=checked, bytes_fetched=row["bytes_fetched"]))
                continue
            record = Record(**json.loads(row["record"]))
            inputs = _unpickle(row["inputs"])
            inputs = {name: inputs[name] for name in self.encoder.input_names(inputs)}
            prepared = Prepared(record, row["key"], inputs, row["content_sha256"], row["etag"], row["last_modified"])
            ready.append((prepared, row["bytes_fetched"]))
        fetched_bytes = 0
        for start in range(0, len(ready), self.batch_size):
            part = ready[start : start + self.batch_size]
            for (_row, nbytes), result in zip(part, encode_batch(self.encoder, [p for p, _ in part])):
                if isinstance(result, Failed):
                    out.append(_result(failure=_failure_json(result.failure), bytes_fetched=nbytes))
                else:
                    assert isinstance(result, Encoded)
                    self.shards.add(entry_of(result))
                    fetched_bytes += nbytes
            if self.shards.pending_bytes >= self.shard_bytes:
                out.append(self._flush(fetched_bytes))
                fetched_bytes = 0
        if self.shards.pending_count:
            out.append(self._flush(fetched_bytes))
        return pa.Table.from_pylist(out, schema=_result_schema())

    def _flush(self, fetched_bytes: int) -> dict[str, Any]:
        written = self.shards.flush()
        assert written is not None
        fault_point("after_shard_write")
        rows = entry_rows(written, self.encoder.fingerprint, self.run_id)
        shard = {"name": written.name, "nbytes": written.nbytes, "sha256": written.sha256, "rows": rows}
        return _result(shard=json.dumps(shard), bytes_fetched=fetched_bytes)


# -- plumbing ---------------------------------------------------------------------------------------


def _describe_model(model: ModelSettings, decode_options: dict[str, object]) -> ModelFacts:
    """Runs on a worker (with its GPU): load the model once to learn its fingerprint and facts."""
    encoder = load_encoder(model, decode_options)
    return ModelFacts(encoder.name, encoder.fingerprint, encoder.family, encoder.describe())


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (Ray's carry whole remote tracebacks)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def _result(
    *, shard: str | None = None, failure: str | None = None, checked: str | None = None, bytes_fetched: int = 0
) -> dict[str, Any]:
    return {"shard": shard, "failure": failure, "checked": checked, "bytes_fetched": bytes_fetched}


def _loaded_schema() -> Any:
    import pyarrow as pa

    text = pa.string()
    return pa.schema([("key", text), ("record", text), ("inputs", pa.binary()), ("content_sha256", text),
                      ("etag", text), ("last_modified", text), ("failure", text), ("bytes_fetched", pa.int64()),
                      ("checked", pa.bool_())])  # fmt: skip


def _result_schema() -> Any:
    import pyarrow as pa

    text = pa.string()
    return pa.schema([("shard", text), ("failure", text), ("checked", text), ("bytes_fetched", pa.int64())])


def _failure_json(failure: FailureRecord) -> str:
    return json.dumps(dataclasses.asdict(failure))


def _pickle(inputs: dict[str, Any]) -> bytes:
    return pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)


def _unpickle(data: bytes) -> dict[str, Any]:
    return pickle.loads(data)  # noqa: S301 - our own CPU tasks' output, never user data
