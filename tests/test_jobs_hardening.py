"""Jobs that cannot be flooded or loop forever, and a registry that does not grow without end.

Against a real Redis (a database of the suite's private redis-server that no other test uses) and,
where a worker matters, a real ``labelloop worker`` (Celery prefork) process. The service's side of
the loop (``request_training`` / ``request_prediction``) runs in a fresh Python process bound
to that database, as ``labelloop serve`` runs it; no Label Studio is needed: a worker that must be
busy talks to a "Label Studio" that accepts connections and never answers.

* a burst of ``TASKS_CREATED`` gives one pending prediction job per (project, version);
* every Redis key labelloop writes has a TTL, the pending slot a short one;
* a pending slot naming a job whose message is gone does not block the next training (and one
  whose message is still queued is joined, not replaced);
* a job that kills its worker's process is failed with a reason after LABELLOOP_MAX_JOB_ATTEMPTS
  deliveries, and acknowledged (not redelivered forever);
* registry retention keeps the serving version, the last N and every hand-promoted version, and a
  pruned version disappears whole (no reader ever sees half a version directory).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

DATABASE = 15  # test_loop's isolated databases are 2..14; the suite's services use 0
# kombu's own structures (the broker): queue lists, the unacked hash and its index; and `_kombu.*`
BROKER_KEYS = {"labelloop.train", "labelloop.predict", "unacked", "unacked_index"}




@pytest.fixture
def db(redis_server):
    """(url, JobStore) of a Redis database emptied for the test."""
    from labelloop.tasks.jobstore import JobStore, connect

    url = redis_server.url.rsplit("/", 1)[0] + f"/{DATABASE}"
    client = connect(url)
    client.flushdb()
    yield url, JobStore(client)
    client.flushdb()


_SERVICE_SIDE = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from labelloop.tasks import jobs
calls = json.loads(sys.argv[1])
def one(call):
    name, args = call
    result = getattr(jobs, name)(*args)
    return list(result) if isinstance(result, tuple) else [result, None]
with ThreadPoolExecutor(16) as pool:
    print(json.dumps(list(pool.map(one, calls))))
"""


def service_side(url: str, calls: list[tuple[str, list]]) -> list[tuple[dict, bool | None]]:
    """Run request_* calls of labelloop.tasks.jobs concurrently in a process bound to ``url``."""
    env = {**os.environ, "REDIS_URL": url}
    done = subprocess.run([sys.executable, "-c", _SERVICE_SIDE, json.dumps(calls)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(r) for r in json.loads(done.stdout.strip().splitlines()[-1])]


def in_broker(client, job_id: str, queue: str) -> bool:
    """The job's Celery message waits in the queue's list or is held, unacknowledged, by a worker."""
    return any(job_id in raw for raw in [*client.lrange(queue, 0, -1), *client.hvals("unacked")])


def keys_without_ttl(client) -> dict[str, int]:
    """Every key but kombu's broker structures, with its TTL where it is not a positive number."""
    found = {}
    for key in client.scan_iter(count=1000):
        if key in BROKER_KEYS or key.startswith("_kombu."):
            continue
        ttl = client.ttl(key)
        if ttl <= 0:
            found[key] = ttl
    return found


# -- coalescing ----------------------------------------------------------------------------------------

def test_a_burst_of_tasks_created_gives_one_pending_prediction_job(db):
    url, store = db
    calls = [("request_prediction", ["41", "p41-v2", "TASKS_CREATED"])] * 40
    calls += [("request_prediction", ["41", "p41-v3", "TASKS_CREATED"])] * 5  # another version: its own job
    results = service_side(url, calls)

    v2 = {job["id"] for job, _ in results[:40]}
    v3 = {job["id"] for job, _ in results[40:]}
    assert len(v2) == 1, f"40 events for one version made {len(v2)} prediction jobs"
    assert len(v3) == 1 and v3 != v2
    assert store.get(next(iter(v2)))["events"] == 40
    predict_jobs = [j for j in store.list("41", limit=500) if j["kind"] == "predict"]
    assert len(predict_jobs) == 2, [j["id"] for j in predict_jobs]
    # one message per job in the queue, nothing else (no worker consumes this database)
    assert store.r.llen("labelloop.predict") == 2
    assert all(in_broker(store.r, job_id, "labelloop.predict") for job_id in v2 | v3)


# -- TTLs ------------------------------------------------------------------------------------------------

def test_every_key_labelloop_writes_expires(db):
    from labelloop.config import settings

    url, store = db
    service_side(url, [("request_training", ["42", "ANNOTATION_CREATED"])] * 10
                 + [("request_prediction", ["42", "p42-v1", "TASKS_CREATED"])] * 10
                 + [("request_training", ["43", "START_TRAINING", True])])
    job = store.create("train", "44", trigger="direct")
    store.update(job["id"], state="running")
    assert store.training_lock("44", job["id"]).acquire()
    store.list("42")

    assert not keys_without_ttl(store.r), f"keys that never expire: {keys_without_ttl(store.r)}"
    keys = sorted(store.r.scan_iter(match="labelloop:*", count=1000))
    assert {"labelloop:jobs", "labelloop:jobs:project:42", "labelloop:train:pending:42",
            "labelloop:predict:pending:42:p42-v1", "labelloop:lock:train:44"} <= set(keys), keys
    # a pending slot lives minutes unless something sees its job alive, not the records' 14 days
    for slot in ("labelloop:train:pending:42", "labelloop:predict:pending:42:p42-v1"):
        assert 0 < store.r.ttl(slot) <= settings().pending_ttl


def test_the_job_indexes_forget_expired_records(db):
    """An index entry outlives its record by at most one write: ids of expired records are trimmed."""
    from labelloop.tasks.jobstore import PREFIX, RECORD_TTL

    _, store = db
    store.r.zadd(f"{PREFIX}:jobs:project:45", {"old": time.time() - RECORD_TTL - 60})
    store.r.zadd(f"{PREFIX}:jobs", {"old": time.time() - RECORD_TTL - 60})
    store.create("train", "45", trigger="direct")
    assert store.r.zscore(f"{PREFIX}:jobs:project:45", "old") is None
    assert store.r.zscore(f"{PREFIX}:jobs", "old") is None
    assert 0 < store.r.ttl(f"{PREFIX}:jobs:project:45") <= RECORD_TTL


# -- stale pending slots --------------------------------------------------------------------------------

def test_a_pending_slot_naming_a_lost_job_does_not_block_the_next_training(db):
    url, store = db
    # The service died between taking the slot and sending the message: a record, a slot, no message.
    lost, created = store.claim_pending("46", "ANNOTATION_CREATED", False)
    assert created and not in_broker(store.r, lost["id"], "labelloop.train")
    store.update(lost["id"], created_at=time.time() - 3600)  # ... an hour ago

    (job, created), = service_side(url, [("request_training", ["46", "ANNOTATION_CREATED"])])
    assert created, "the event joined a job that will never run: auto-training is off for this project"
    assert job["id"] != lost["id"]
    assert in_broker(store.r, job["id"], "labelloop.train")
    assert store.r.get(store.pending_key("46")) == job["id"]
    old = store.get(lost["id"])
    assert old["state"] == "failed" and old["reason"].startswith("lost")

    # A job that is old but whose message is still queued (workers busy elsewhere) is joined.
    store.update(job["id"], created_at=time.time() - 3600)
    (again, created), = service_side(url, [("request_training", ["46", "ANNOTATION_CREATED"])])
    assert not created and again["id"] == job["id"] and again["events"] == 2
    assert store.r.llen("labelloop.train") == 1


# -- a job that kills its worker ------------------------------------------------------------------------

@pytest.fixture
def silent_label_studio():
    """An HTTP address that accepts connections and never answers: a job using it stays running."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def pool_processes(pid: int) -> list[int]:
    """The worker's pool (child) processes, where Celery's prefork pool runs the jobs."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_job_that_kills_its_worker_is_failed_after_max_attempts_not_redelivered_forever(
        db, silent_label_studio, tmp_path):
    from labelloop.dev.localstack import start_worker
    from labelloop.tasks.celery_app import make_app

    url, store = db
    worker = start_worker(tmp_path / "home", queues="train", env={
        "REDIS_URL": url, "LABEL_STUDIO_URL": silent_label_studio, "LABEL_STUDIO_API_KEY": "0" * 40,
        "LABELLOOP_MAX_JOB_ATTEMPTS": "3", "LABELLOOP_LOCK_TTL": "2", "MODEL_DIR": str(tmp_path / "models")})
    try:
        saved, os.environ["REDIS_URL"] = os.environ["REDIS_URL"], url
        try:
            app = make_app()
        finally:
            os.environ["REDIS_URL"] = saved
        job = store.create("train", "47", trigger="test", force=True)
        app.send_task("labelloop.train_project", args=[job["id"], "47"], task_id=job["id"], queue="labelloop.train")

        # What an image bomb does to the pool process running the job (the OOM killer's SIGKILL),
        # three times: each time Celery hands the message back (reject_on_worker_lost) at once.
        for attempt in (1, 2, 3):
            record = wait_for(lambda attempt=attempt: (j := store.get(job["id"]))["state"] == "running"
                              and j.get("attempts") == attempt and j, 60, f"attempt {attempt}")
            pool = pool_processes(worker.process.pid)
            assert len(pool) == 1, f"expected one pool process, found {pool}"
            os.kill(pool[0], signal.SIGKILL)
            wait_for(lambda pool=pool: not _alive(pool[0]), 10, "the pool process to die", every=0.05)

        final = wait_for(lambda: (j := store.get(job["id"]))["state"] != "running" or j["attempts"] > 3 and j,
                         60, "the fourth delivery to give up")
        final = store.get(job["id"])
        assert final["state"] == "failed", f"delivered again after 3 deaths: {final}"
        assert final["attempts"] == 3
        assert "worker died 3 times while running this job" in final["reason"]
        assert f"last seen on host {record['worker']} (pid {pool[0]})" in final["reason"]
        # acknowledged: the message is in neither the queue nor the unacked hash, and stays gone
        wait_for(lambda: not in_broker(store.r, job["id"], "labelloop.train"), 10, "the message to be acked")
        time.sleep(3)
        assert not in_broker(store.r, job["id"], "labelloop.train")
        assert store.get(job["id"])["attempts"] == 3
        assert worker.process.poll() is None, "the worker itself keeps running"
        assert not keys_without_ttl(store.r), f"keys that never expire: {keys_without_ttl(store.r)}"
    finally:
        worker.stop()


# -- registry retention ---------------------------------------------------------------------------------

def _add(registry, project, n_files: int = 0):
    source = registry.root / "w.pt"
    source.write_bytes(os.urandom(64))
    manifest = registry.add_version(project, source, {
        "parent": None, "task": "detect", "task_type": "detection", "classes": ["a"]})
    for i in range(n_files):  # a version with many files takes a while to delete
        (Path(manifest.path) / f"extra-{i:04d}.bin").write_bytes(b"x")
    return manifest.version


def test_registry_prune_keeps_serving_hand_promoted_and_the_newest(tmp_path):
    from labelloop.core.registry import Registry

    registry = Registry(tmp_path)
    names = [_add(registry, 7) for _ in range(15)]
    registry.promote_by_hand(7, names[2], reason="rollback by an operator")  # p7-v3, by hand
    registry.promote(7, names[12], reason="better on the tuning split")  # automatic
    registry.promote(7, names[5], reason="automatic again")  # serving p7-v6, never promoted by hand
    assert [p["version"] for p in registry.manual_promotions(7)] == [names[2]]

    removed = registry.prune(7, keep_last=4)
    kept = [m.version for m in registry.versions(7)]
    assert kept == [names[2], names[5], *names[11:]], kept
    assert removed == [n for n in names if n not in kept]
    assert registry.serving(7).version == names[5]
    assert registry.prune(7, keep_last=4) == []  # nothing more to do
    project_dir = registry.project_dir(7)
    assert sorted(p.name for p in project_dir.iterdir() if p.name.startswith(".")) == []
    for name in kept:
        assert (project_dir / "versions" / name / "manifest.json").is_file()
        assert (project_dir / "versions" / name / "weights.pt").is_file()


def test_registry_prune_never_shows_half_a_version(tmp_path):
    """Readers listing versions while a prune runs see whole versions or none; a crashed prune's
    leftover is invisible to readers and deleted by the next prune."""
    from labelloop.core.registry import Registry

    registry = Registry(tmp_path)
    names = [_add(registry, 8, n_files=400) for _ in range(6)]
    registry.promote(8, names[-1], reason="newest")
    versions_dir = registry.project_dir(8) / "versions"
    half, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            for child in list(versions_dir.iterdir()):
                if not (child / "manifest.json").exists() and child.exists():
                    half.append(child.name)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        removed = registry.prune(8, keep_last=1)
    finally:
        stop.set()
        watcher.join(10)
    assert removed == names[:-1]
    assert not half, f"a reader saw version directories without their manifest: {sorted(set(half))}"

    # what a pruner killed between its rename and its delete leaves behind
    leftover = registry.project_dir(8) / f".trash-{names[0]}-dead"
    leftover.mkdir()
    (leftover / "weights.pt").write_bytes(b"half")
    assert [m.version for m in registry.versions(8)] == [names[-1]]
    _add(registry, 8)
    registry.prune(8, keep_last=1)
    assert not leftover.exists()
