"""Job records, per-project training locks and coalescing, kept in Redis.

Why not only Celery's result backend: Label Studio's webhook must be answered in a few ms and a
burst of 100 annotation events must cause at most two trainings. So a training request is one
``SET NX`` on the project's *pending* slot: the first event of a burst creates a job and enqueues it,
the others find the slot taken and join that job. The job frees the slot when it starts running
(after taking the project lock), so events arriving during a training create exactly one new
pending job, which reads the newest annotations when it starts. At most one running, one pending.

A job record is a JSON document: id, kind, project, state (queued | running | done | failed |
skipped), progress 0..1, message, metrics, reason, version, timestamps, attempts.
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
        pipe.zadd(f"{PREFIX}:jobs", {job["id"]: job["created_at"]})
        pipe.zadd(f"{PREFIX}:jobs:project:{project}", {job["id"]: job["created_at"]})
        pipe.execute()
        return job

    def delete(self, job: dict[str, Any]) -> None:
        self.r.delete(self._key(job["id"]))
        self.r.zrem(f"{PREFIX}:jobs", job["id"])
        self.r.zrem(f"{PREFIX}:jobs:project:{job['project']}", job["id"])

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._key(job_id))
        return json.loads(raw) if raw else None

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Merge fields into a record (read-modify-write under WATCH so concurrent updates do not lose fields)."""
        key = self._key(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    job = json.loads(raw) if raw else {"id": job_id}
                    job.update(fields)
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

    def count_by_state(self, limit: int = 1000) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.list(limit=limit):
            counts[f"{job['kind']}:{job['state']}"] = counts.get(f"{job['kind']}:{job['state']}", 0) + 1
        return counts

    # -- coalescing ----------------------------------------------------------------------------
    def pending_key(self, project: str) -> str:
        return f"{PREFIX}:train:pending:{project}"

    def claim_pending(self, project: str, trigger: str, force: bool) -> tuple[dict[str, Any], bool]:
        """(job, created): a new queued training job for the project, or the pending one to join."""
        key = self.pending_key(project)
        for _ in range(3):
            # The record exists before the slot names it, so a slot never points at nothing.
            job = self.create("train", project, trigger=trigger, force=force, events=1)
            if self.r.set(key, job["id"], nx=True, ex=RECORD_TTL):
                return job, True
            self.delete(job)
            existing_id = self.r.get(key)
            existing = self.get(existing_id) if existing_id else None
            if existing is None or existing.get("state") in FINISHED:
                self.r.delete(key)  # a stale slot (its job ended or expired): take it over
                continue
            fields = {"events": int(existing.get("events", 1)) + 1}
            if force:
                fields["force"] = True
            return self.update(existing["id"], **fields), False
        raise RuntimeError(f"could not claim the training slot of project {project}")

    def release_pending(self, project: str, job_id: str) -> None:
        """Free the slot if it still names this job (a running job no longer collects events)."""
        key = self.pending_key(project)
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.get(key) == job_id:
                    pipe.multi()
                    pipe.delete(key)
                    pipe.execute()
            except redis.WatchError:
                pass

    # -- the per-project training lock ---------------------------------------------------------
    def training_lock(self, project: str, job_id: str) -> "ProjectLock":
        return ProjectLock(self.r, f"{PREFIX}:lock:train:{project}", job_id)


class ProjectLock:
    """A Redis lock with a TTL, renewed while held, so it expires if its holder dies."""

    def __init__(self, client: redis.Redis, key: str, token: str, ttl: int = LOCK_TTL):
        self.r, self.key, self.token, self.ttl = client, key, token, ttl

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.token, nx=True, ex=self.ttl))

    def holder(self) -> str | None:
        return self.r.get(self.key)

    def renew(self) -> bool:
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
        return bool(self.r.eval(script, 1, self.key, self.token, self.ttl))

    def release(self) -> None:
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
        self.r.eval(script, 1, self.key, self.token)
