"""A prediction job's chunks spread over every prediction worker: work-stealing through Redis.

The job's worker (it holds the project's prediction lock) writes the chunks under the job's keys, puts their
indices on a Redis list, queues ``HELPERS`` helper tasks on the prediction queue and takes chunks itself;
a helper, on whichever worker picks it up, takes chunks until the list is empty. One worker alone finishes
the job (its helpers start afterwards and find nothing); N workers on N machines share it.

* a chunk is **leased** while it runs: when its worker dies (the lease runs out) it goes back on the list;
* a chunk that **fails** is retried alone, up to ``CHUNK_ATTEMPTS`` times, then its tasks count as errors
  with the reason (the rest of the job goes on);
* a second delivery of the job (its worker died) waits for the chunks still running elsewhere, then reads the
  project afresh: what the first delivery pushed holds this version's prediction and is skipped, so no task is
  pushed twice;
* chunks go on the list while the job still reads the project (a ``producing`` key tells helpers to wait for
  more), so other workers predict the first chunks while the rest are read;
* progress is the share of chunks done, whoever did them;
* a job's second kind of work (its scores of the human labels, ``backlog.SCORE``) runs the same way under keys
  of its own (``<job id>:score``).

Workers on other machines need what every prediction worker needs: the model volume (MODEL_DIR, the
version's weights) and Label Studio's media (over HTTP, or the shared media folder).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from labelloop.errors import reason_of
from labelloop.tasks.celery_app import PREDICT_QUEUE, app
from labelloop.tasks.jobstore import PREFIX, RECORD_TTL, JobStore

log = logging.getLogger(__name__)

HELPERS = 16  # helper tasks asked per job (more than there are workers is harmless: the spare ones find nothing)
LEASE_S = 600  # a chunk not finished this long after it was taken goes back on the list (its worker died)
CHUNK_ATTEMPTS = 3
POLL_S = 0.2
PRODUCING_TTL = 120  # seconds the "still reading" mark lives unless the job's next chunk renews it


@dataclass(frozen=True)
class ShardKeys:
    todo: str  # list of chunk indices waiting
    chunks: str  # hash: index -> the chunk's tasks (JSON)
    context: str  # the ChunkContext (JSON)
    results: str  # hash: index -> what the chunk returned (backlog.run_chunk, JSON)
    leases: str  # hash: index -> when its lease runs out (epoch seconds)
    attempts: str  # hash: index -> failed attempts
    producing: str  # set while the job still puts chunks on the list

    @classmethod
    def of(cls, job_id: str) -> ShardKeys:
        base = f"{PREFIX}:shard:{job_id}"
        names = ("todo", "chunks", "context", "results", "leases", "attempts", "producing")
        return cls(*(f"{base}:{name}" for name in names))

    def all(self) -> list[str]:
        return [self.todo, self.chunks, self.context, self.results, self.leases, self.attempts, self.producing]


def _take_and_run(store: JobStore, keys: ShardKeys, context, client, fetcher, worker: str) -> bool:
    """Take one chunk off the list and run it; False when the list was empty."""
    from labelloop.workflows.backlog import run_chunk

    r = store.r
    raw = r.lpop(keys.todo)
    if raw is None:
        return False
    index = int(raw)
    if r.hexists(keys.results, index):  # put back after its lease ran out, but its worker finished after all
        return True
    r.hset(keys.leases, index, time.time() + LEASE_S)
    r.expire(keys.leases, RECORD_TTL)
    tasks = json.loads(r.hget(keys.chunks, index) or "[]")
    try:
        out = run_chunk(context, tasks, client=client, fetcher=fetcher)
    except Exception as exc:
        attempts = int(r.hincrby(keys.attempts, index, 1))
        r.expire(keys.attempts, RECORD_TTL)
        log.warning("chunk %s of %s failed (attempt %d): %s", index, keys.todo, attempts, exc)
        if attempts < CHUNK_ATTEMPTS:
            r.rpush(keys.todo, index)
        else:
            r.hset(keys.results, index, json.dumps({"pushed": {}, "errors": len(tasks),
                                                    "failed": f"{attempts} attempts: {reason_of(exc)}"}))
            r.expire(keys.results, RECORD_TTL)
        r.hdel(keys.leases, index)
        return True
    pipe = r.pipeline()
    pipe.hset(keys.results, index, json.dumps({**out, "worker": worker}))
    pipe.hdel(keys.leases, index)
    pipe.expire(keys.results, RECORD_TTL)
    pipe.execute()
    return True


def _requeue_expired(store: JobStore, keys: ShardKeys) -> int:
    """Chunks whose lease ran out (their worker died) go back on the list; how many."""
    r, now, back = store.r, time.time(), 0
    for raw_index, raw_until in r.hgetall(keys.leases).items():
        index = int(raw_index)
        if float(raw_until) < now and r.hdel(keys.leases, index) and not r.hexists(keys.results, index):
            log.warning("chunk %s of %s: its worker died; back on the list", index, keys.todo)
            r.hincrby(keys.attempts, index, 1)
            r.rpush(keys.todo, index)
            back += 1
    return back


def _clients():
    from labelloop.labelstudio.client import StudioClient
    from labelloop.labelstudio.media import MediaFetcher

    return StudioClient.from_settings(), MediaFetcher.from_settings()


def _wait_for_live_chunks(store: JobStore, keys: ShardKeys) -> None:
    """A second delivery of a job: wait until the chunks other workers still run (their lease is live) are done,
    so that what they push is in Label Studio before the job reads the project again."""
    r = store.r
    while any(float(until) >= time.time() for until in r.hgetall(keys.leases).values()):
        time.sleep(POLL_S)


def run_on_workers(job_id: str, worker: str = "", helpers: int = HELPERS, store: JobStore | None = None):
    """A ``backlog.ChunkRunner`` for the prediction job ``job_id`` running on ``worker``: it and any free
    prediction worker take the chunks (each chunk's result names who did it). Chunks go on the list as they come
    (the job reads the project while helpers already predict its first chunks); the job's worker takes chunks once
    they are all out, then waits for the rest and yields every chunk's result in order.

    A second delivery of the job (its worker died) first waits for the chunks still running elsewhere, then starts
    afresh: it reads the project again, so the tasks the first delivery pushed hold this version's prediction and
    are not in its chunks (Label Studio, not this shard, says what is done)."""
    worker = worker or socket.gethostname()

    def runner(context, chunks: Iterable[list[dict[str, Any]]], progress) -> Iterator[dict[str, Any]]:
        from labelloop.workflows.backlog import CHUNK, PREDICT, expected_tasks

        shards = store or JobStore()
        # each kind of work of the job (its predictions, then its scores of the human labels) has its own keys
        shard = job_id if context.work == PREDICT else f"{job_id}:{context.work}"
        r, keys = shards.r, ShardKeys.of(shard)
        _wait_for_live_chunks(shards, keys)
        pipe = r.pipeline()
        pipe.delete(keys.todo, keys.chunks, keys.results, keys.leases, keys.attempts)
        pipe.set(keys.context, json.dumps(context.to_json()), ex=RECORD_TTL)
        pipe.set(keys.producing, 1, ex=PRODUCING_TTL)  # helpers wait for more chunks while this lives
        pipe.execute()
        count, asked = 0, 0

        def share(finished: int) -> float:  # of the chunks the whole backlog will make, as far as the read knows
            estimate = len(chunks) if isinstance(chunks, list) else -(-(expected_tasks(chunks) or 0) // CHUNK)
            return finished / max(1, count, estimate)

        try:
            client, fetcher = _clients()
            with client, fetcher:
                try:
                    for index, chunk in enumerate(chunks):  # a chunk on the list as soon as the read has made it
                        pipe = r.pipeline()
                        pipe.hset(keys.chunks, str(index), json.dumps(chunk))
                        pipe.rpush(keys.todo, index)
                        pipe.set(keys.producing, 1, ex=PRODUCING_TTL)  # a heartbeat: a dead job's helpers give up
                        for key in keys.all():
                            pipe.expire(key, RECORD_TTL if key != keys.producing else PRODUCING_TTL)
                        pipe.execute()
                        count = index + 1
                        if count >= 2 and asked < helpers:  # the first chunks: one more helper each, up to helpers
                            predict_chunks.apply_async(args=[shard], queue=PREDICT_QUEUE, retry=False)
                            asked += 1
                        finished = int(r.hlen(keys.results))
                        progress(share(finished), f"{finished} of {count} chunk(s) predicted, the project still read")
                finally:
                    r.delete(keys.producing)
                while count:
                    took = _take_and_run(shards, keys, context, client, fetcher, worker)
                    finished = int(r.hlen(keys.results))
                    progress(finished / count, f"{finished} of {count} chunks predicted")
                    if finished >= count:
                        break
                    if not took:  # the rest are running elsewhere: wait, and take back a dead worker's
                        _requeue_expired(shards, keys)
                        time.sleep(POLL_S)
            failed = 0
            for index in range(count):  # one result at a time: the job folds them, memory holds one
                raw = r.hget(keys.results, str(index))
                out = json.loads(raw) if raw else {"pushed": {}, "errors": 0, "failed": "no result recorded"}
                if out.get("failed"):
                    failed += 1
                    if failed == 1:
                        log.error("job %s: chunk %d failed for good: %s", job_id, index, out["failed"])
                yield out
            if failed > 1:
                log.error("job %s: %d chunk(s) failed for good", job_id, failed)
        finally:
            r.delete(keys.todo, keys.producing)  # helpers still queued find nothing; the rest expires with the job

    return runner


@app.task(name="labelloop.predict_chunks", bind=True, acks_late=True, reject_on_worker_lost=True)
def predict_chunks(self, shard: str) -> dict[str, Any]:
    """A helper of a prediction job: take the chunks of ``shard`` (the job's id, or ``<job id>:score`` for its
    scores of the human labels) until none are left."""
    from labelloop.workflows.backlog import ChunkContext

    store = JobStore()
    keys = ShardKeys.of(shard)
    raw = store.r.get(keys.context)
    if raw is None or not (store.r.llen(keys.todo) or store.r.exists(keys.producing)):
        return {"took": 0}
    context = ChunkContext.from_json(json.loads(raw))
    took, worker = 0, self.request.hostname or socket.gethostname()
    client, fetcher = _clients()
    with client, fetcher:
        while True:
            if _take_and_run(store, keys, context, client, fetcher, worker):
                took += 1
            elif store.r.exists(keys.producing):  # the job is still reading: more chunks are coming
                time.sleep(POLL_S)
            else:
                break
    log.info("helper on %s took %d chunk(s) of %s", worker, took, shard)
    return {"took": took, "worker": worker}
