"""Job records, per-project training locks and coalescing, kept in Redis.

Why not only Celery's result backend: Label Studio's webhook must be answered in a few ms and a
burst of 100 annotation events must cause at most two trainings. So a training request is one
``SET NX`` on the project's *pending* slot: the first event of a burst creates a job and enqueues it,
the others find the slot taken and join that job. The job frees the slot when it starts running
(after taking the project lock), so events arriving during a training create exactly one new
pending job, which reads the newest annotations when it starts. At most one running, one pending.

Prediction jobs are coalesced the same way, per (project, version): a burst of ``TASKS_CREATED``
events gives one pending prediction job, which predicts every task still without a prediction of
that version when it starts.

A pending slot must never point at a job that will never run (the slot would swallow every later
event: auto-training silently off). So a slot has a TTL (``LABELLOOP_PENDING_TTL``), renewed by
whoever sees the job alive (an event that joins it, the job itself while it waits for the project
lock), and an event that finds a slot checks the job it names: finished, expired, or queued for
longer than the debounce plus a grace period while its message is in none of the broker's places
(the queue list, the unacked hash) means lost: the job is failed with that reason and the slot taken
over.

Every key written here expires: job records and the job indexes after ``RECORD_TTL`` (the indexes
are trimmed of ids older than that on each write), slots after the pending TTL, locks after
``LOCK_TTL`` unless renewed.

A job record is a JSON document: id, kind, project, state (queued | running | done | failed |
skipped), progress 0..1, message, metrics, reason, version, timestamps, attempts (deliveries that
started running it: a worker that dies mid-job leaves it "running", and the next delivery counts one
more; see ``labelloop.tasks.jobs``), worker and pid of the last attempt.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import redis

from labelloop.config import settings

PREFIX = "labelloop"
FINISHED = ("done", "failed", "skipped")
RECORD_TTL = 14 * 24 * 3600
# seconds; renewed by the holder every LOCK_TTL / 4, so a dead holder frees it within a minute
LOCK_TTL = int(os.environ.get("LABELLOOP_LOCK_TTL", "60"))
# A queued job younger than this is alive even if the broker does not show its message yet (the slot
# is taken before the message is sent) or any more (a worker popped it and is about to run it).
PENDING_GRACE_S = 60
# kombu's Redis transport keeps delivered, unacknowledged messages (running, or held until their
# countdown) in this hash; waiting messages are in a list named after the queue.
BROKER_UNACKED = "unacked"
QUEUE_OF = {"train": "labelloop.train", "predict": "labelloop.predict", "warm-start": "labelloop.train"}


def connect(url: str | None = None) -> redis.Redis:
    return redis.Redis.from_url(url or settings().redis_url, socket_connect_timeout=1, socket_timeout=5,
                                decode_responses=True)


class JobStore:
    def __init__(self, client: redis.Redis | None = None):
        self.r = client or connect()

    # -- records -------------------------------------------------------------------------------
    def _key(self, job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    def create(self, kind: str, project: str, job_id: str | None = None, **fields: Any) -> dict[str, Any]:
        job = {"id": job_id or uuid.uuid4().hex, "kind": kind, "project": str(project), "state": "queued", "progress": 0.0,
               "message": "queued", "created_at": time.time(), "attempts": 0, **fields}
        pipe = self.r.pipeline()
        pipe.set(self._key(job["id"]), json.dumps(job), ex=RECORD_TTL)
        for index in (f"{PREFIX}:jobs", f"{PREFIX}:jobs:project:{project}"):
            # an index lives as long as its newest record; ids whose records expired are trimmed
            pipe.zadd(index, {job["id"]: job["created_at"]})
            pipe.zremrangebyscore(index, "-inf", job["created_at"] - RECORD_TTL)
            pipe.expire(index, RECORD_TTL)
        pipe.execute()
        return job

    def delete(self, job: dict[str, Any]) -> None:
        self.r.delete(self._key(job["id"]))
        self.r.zrem(f"{PREFIX}:jobs", job["id"])
        self.r.zrem(f"{PREFIX}:jobs:project:{job['project']}", job["id"])

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._key(job_id))
        return json.loads(raw) if raw else None

    def update(self, job_id: str, _count: str | None = None, **fields: Any) -> dict[str, Any]:
        """Merge fields into a record (read-modify-write under WATCH so concurrent updates do not lose
        fields); ``_count`` names a counter to increment in the same write."""
        key = self._key(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    job = json.loads(raw) if raw else {"id": job_id}
                    job.update(fields)
                    if _count:
                        job[_count] = int(job.get(_count, 1)) + 1
                    job["updated_at"] = time.time()
                    pipe.multi()
                    pipe.set(key, json.dumps(job), ex=RECORD_TTL)
                    pipe.execute()
                    return job
                except redis.WatchError:
                    continue

    def list(self, project: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        index = f"{PREFIX}:jobs:project:{project}" if project else f"{PREFIX}:jobs"
        ids = self.r.zrevrange(index, 0, max(0, limit - 1))
        raws = self.r.mget([self._key(i) for i in ids]) if ids else []
        return [json.loads(raw) for raw in raws if raw]

    # -- coalescing ----------------------------------------------------------------------------
    def pending_key(self, project: str, kind: str = "train", version: str | None = None) -> str:
        if kind == "train":
            return f"{PREFIX}:train:pending:{project}"
        return f"{PREFIX}:{kind}:pending:{project}:{version}"

    def claim_pending(self, project: str, trigger: str, force: bool = False, kind: str = "train",
                      version: str | None = None, pending_ttl: int | None = None,
                      countdown: float = 0) -> tuple[dict[str, Any], bool]:
        """(job, created): a new queued job of ``kind`` for the project (and version, for predictions),
        or the pending one to join. The caller enqueues a created job (or fails it and releases)."""
        key = self.pending_key(project, kind, version)
        ttl = int(pending_ttl or settings().pending_ttl)
        extra: dict[str, Any] = {"force": force} if kind == "train" else {"version": version}
        extra["countdown"] = countdown
        for _ in range(3):
            # The record exists before the slot names it, so a slot never points at nothing.
            job = self.create(kind, project, trigger=trigger, events=1, **extra)
            if self.r.set(key, job["id"], nx=True, ex=ttl):
                return job, True
            self.delete(job)
            existing_id = self.r.get(key)
            existing = self.get(existing_id) if existing_id else None
            if existing is None or existing.get("state") in FINISHED:
                self._drop_slot(key, existing_id)  # a stale slot (its job ended or expired): take it over
                continue
            if not self.alive(existing):
                self.update(existing["id"], state="failed", finished_at=time.time(), message="lost",
                            reason="lost: queued but its message is no longer in the queue (a new job replaces it)")
                self._drop_slot(key, existing_id)
                continue
            self.r.expire(key, ttl)  # seen alive: the slot lives on
            return self.update(existing["id"], _count="events", **({"force": True} if force else {})), False
        raise RuntimeError(f"could not claim the {kind} slot of project {project}")

    def mark_once(self, what: str, project: str, version: str, job_id: str) -> bool:
        """True the first time ``what`` is asked for (project, version), False ever after (for the
        records' lifetime): the backlog prediction a project gets when it first has a model is queued
        once, however often Label Studio calls /setup."""
        return bool(self.r.set(f"{PREFIX}:once:{what}:{project}:{version}", job_id, nx=True, ex=RECORD_TTL))

    def unmark_once(self, what: str, project: str, version: str, job_id: str) -> None:
        """Undo ``mark_once`` (the job it named could not be queued), if it still names ``job_id``."""
        self._drop_slot(f"{PREFIX}:once:{what}:{project}:{version}", job_id)

    def _drop_slot(self, key: str, job_id: str | None) -> None:
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
        if job_id is None:
            return
        self.r.eval(script, 1, key, job_id)

    def alive(self, job: dict[str, Any]) -> bool:
        """Whether a queued job will still run: young, running, or its message held by the broker."""
        if job.get("state") == "running":
            return True
        if time.time() - float(job.get("created_at", 0)) < PENDING_GRACE_S + float(job.get("countdown", 0)):
            return True
        return self.in_broker(job["id"], QUEUE_OF.get(job.get("kind", ""), ""))

    def in_broker(self, job_id: str, queue: str) -> bool:
        """The job's Celery message is waiting in ``queue`` or delivered and not yet acknowledged.

        Both places are bounded (coalescing keeps at most one pending job per project and version;
        unacked holds what workers have in hand), so a scan is cheap. Task ids are uuid4 hex: a
        substring match on the raw message is exact enough.
        """
        if queue and any(job_id in raw for raw in self.r.lrange(queue, 0, -1)):
            return True
        return any(job_id in raw for raw in self.r.hvals(BROKER_UNACKED))

    def renew_pending(self, project: str, job_id: str, kind: str = "train", version: str | None = None,
                      pending_ttl: int | None = None) -> None:
        """Extend the slot's TTL if it still names this job (the job is in a worker's hands)."""
        script = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) "
                  "else return 0 end")
        self.r.eval(script, 1, self.pending_key(project, kind, version), job_id,
                    int(pending_ttl or settings().pending_ttl))

    def release_pending(self, project: str, job_id: str, kind: str = "train", version: str | None = None) -> None:
        """Free the slot if it still names this job (a running job no longer collects events)."""
        self._drop_slot(self.pending_key(project, kind, version), job_id)

    # -- the per-project training lock ---------------------------------------------------------
    def training_lock(self, project: str, job_id: str) -> ProjectLock:
        return ProjectLock(self.r, f"{PREFIX}:lock:train:{project}", job_id)

    def prediction_lock(self, project: str, job_id: str) -> ProjectLock:
        """One prediction job per project at a time (two would push the same tasks twice)."""
        return ProjectLock(self.r, f"{PREFIX}:lock:predict:{project}", job_id)


class ProjectLock:
    """A Redis lock with a TTL, renewed while held, so it expires if its holder dies."""

    def __init__(self, client: redis.Redis, key: str, token: str, ttl: int = LOCK_TTL):
        self.r, self.key, self.token, self.ttl = client, key, token, ttl

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.token, nx=True, ex=self.ttl))

    def renew(self) -> bool:
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
        return bool(self.r.eval(script, 1, self.key, self.token, self.ttl))

    def release(self) -> None:
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
        self.r.eval(script, 1, self.key, self.token)
