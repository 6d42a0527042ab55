"""Celery jobs: train a project's next version, push predictions for its unlabeled tasks.

Both are thin: the work is the engine's (labelloop.workflows.pipeline); a job adds the lock, the job record,
progress, and what happens next (a promotion enqueues a prediction job).

Delivery is at least once (acks_late; a killed worker's job is delivered again), so a job must be
safe to run twice: a finished job record ends a second delivery at once; a training (and a
prediction job) waits for the project's lock, which a dead holder stops renewing; predictions
already pushed for a version are not pushed again; a registry version is written atomically, so a
killed training leaves none.

But not without end: a job that kills its worker (an image that exhausts memory, a native crash)
would be delivered, kill, be delivered again forever. Every delivery that starts running a job
counts one attempt in its record (before any work); a delivery that finds the job still "running"
after ``LABELLOOP_MAX_JOB_ATTEMPTS`` attempts (each one ended by its worker dying) fails it with
that reason and is acknowledged.

After each training the project's registry is pruned (``Registry.prune``): the serving version,
the ``LABELLOOP_KEEP_VERSIONS`` newest and every version promoted by hand are kept.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from labelloop.config import settings
from labelloop.errors import reason_of
from labelloop.tasks.celery_app import PREDICT_QUEUE, TRAIN_QUEUE, app
from labelloop.tasks.jobstore import FINISHED, LOCK_TTL, JobStore

log = logging.getLogger(__name__)

LOCK_WAIT_S = 5  # a training waiting for its project's lock looks again this often
# Annotation events start their training a few seconds late: Label Studio sends the webhook while it
# is still saving (the export may not show the annotation yet), and a labeler's next saves join it.
DEBOUNCE_S = 5


# -- what the service calls (fast: a few Redis round trips) -------------------------------------------

def request_training(project: str, trigger: str, force: bool = False,
                     store: JobStore | None = None) -> tuple[dict[str, Any], bool]:
    """(job, created): enqueue a training of ``project`` or join the one already pending."""
    store = store or JobStore()
    countdown = 0 if force else DEBOUNCE_S
    job, created = store.claim_pending(str(project), trigger, force, countdown=countdown)
    if created:
        _enqueue(store, train_project, job, [job["id"], str(project)], TRAIN_QUEUE, countdown)
    return job, created


def request_prediction_job(project: str, version: str, trigger: str, store: JobStore | None = None,
                           countdown: float = DEBOUNCE_S) -> tuple[dict[str, Any], bool]:
    """(job, created): enqueue predictions of ``version`` for the project's unlabeled tasks, or join
    the job already pending for that (project, version). ``countdown``: new tasks come in bursts
    (one ``TASKS_CREATED`` per import), so by default the job starts a few seconds late and sees them all."""
    store = store or JobStore()
    job, created = store.claim_pending(str(project), trigger, kind="predict", version=version, countdown=countdown)
    if created:
        _enqueue(store, predict_project, job, [job["id"], str(project), version], PREDICT_QUEUE, countdown)
    return job, created


def request_warm_start(project: str, trigger: str, store: JobStore | None = None) -> tuple[dict[str, Any], bool]:
    """(job, created): enqueue the project's self-supervised warm start (``pipeline.build_warm_start``) on
    the training queue, or join the pending one. Queued at connect and on imports, it runs before the
    first training (same queue, same project lock), which then starts from it."""
    store = store or JobStore()
    job, created = store.claim_pending(str(project), trigger, kind="warm-start", version="-", countdown=DEBOUNCE_S)
    if created:
        _enqueue(store, warm_start_project, job, [job["id"], str(project)], TRAIN_QUEUE, DEBOUNCE_S)
    return job, created


def request_prediction(project: str, version: str, trigger: str, store: JobStore | None = None,
                       countdown: float = DEBOUNCE_S) -> dict[str, Any]:
    """The prediction job for ``version`` (a new one, or the pending one it joined)."""
    return request_prediction_job(project, version, trigger, store, countdown)[0]


def request_backlog_prediction(project: str, version: str, trigger: str, store: JobStore | None = None,
                               countdown: float = DEBOUNCE_S) -> dict[str, Any] | None:
    """The one backlog prediction a project gets when it first has a model (``/setup`` of a project a base
    model serves): a prediction job for ``version``, coalesced like any other, and never asked for twice
    for the same (project, version) — None when it was asked for before. The job itself skips tasks that
    already hold a prediction of ``version``."""
    store = store or JobStore()
    marker = f"asked-{time.time():.0f}"
    if not store.mark_once("backlog", str(project), version, marker):
        return None
    try:
        return request_prediction(project, version, trigger, store, countdown)
    except Exception:
        store.unmark_once("backlog", str(project), version, marker)  # not queued: the next /setup asks again
        raise


def promote_version(registry, version: str, reason: str, by: str = "",
                    store: JobStore | None = None) -> dict[str, Any]:
    """Serve ``version`` by a person's choice (``POST /versions/{version}/promote``, ``labelloop promote`` and
    ``rollback``): recorded as a promotion by hand (retention keeps it), served at once, and its
    predictions queued for every unlabeled task without one (the job then makes it the project's model
    version in Label Studio). The queue being down does not undo the promotion: the answer says so."""
    from labelloop.core.registry import version_project

    project = version_project(version)
    manifest = registry.promote_by_hand(project, version, reason=reason, by=by)
    answer: dict[str, Any] = {"project": project, "serving": manifest.version}
    try:
        answer["prediction_job"] = request_prediction(project, version, f"promotion of {version} ({by or 'by hand'})",
                                                      store, countdown=0)["id"]
    except Exception as exc:
        answer["warning"] = f"served now, but predictions were not queued: {exc}"
    return answer


def _enqueue(store: JobStore, task, job: dict[str, Any], args: list, queue: str, countdown: float) -> None:
    try:
        task.apply_async(args=args, task_id=job["id"], queue=queue, countdown=countdown, retry=False)
    except Exception as exc:
        store.release_pending(job["project"], job["id"], job["kind"], job.get("version"))
        store.update(job["id"], state="failed", reason=f"could not enqueue: {exc}", finished_at=time.time())
        raise


# -- the jobs -------------------------------------------------------------------------------------------

class _Heartbeat(threading.Thread):
    """Renews the project lock while the job runs; stops when told or when the lock is lost."""

    def __init__(self, lock):
        super().__init__(daemon=True)
        self.lock, self.stopped = lock, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(LOCK_TTL / 4):
            try:
                renewed = self.lock.renew()
            except Exception as exc:  # a Redis hiccup: try again next beat (the TTL leaves three more)
                log.warning("could not renew the lock %s: %s", self.lock.key, exc)
                continue
            if not renewed:
                log.error("lost the lock %s", self.lock.key)
                return


def _progress(task, store: JobStore, job_id: str):
    last = [0.0]

    def report(fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and fraction < 1.0:  # at most two Redis writes a second
            return
        last[0] = now
        store.update(job_id, progress=round(float(fraction), 3), message=message)
        task.update_state(state="PROGRESS", meta={"progress": fraction, "message": message})

    return report


def _start_attempt(task, store: JobStore, job: dict[str, Any]) -> dict[str, Any] | None:
    """Count this delivery as an attempt, or end a job whose worker died too often (None: go on)."""
    attempts = int(job.get("attempts", 0))
    limit = settings().max_job_attempts
    if job.get("state") == "running" and attempts >= limit:
        # Every earlier attempt set "running" and none finished: each ended with its worker dying.
        where = job.get("worker") or "an unknown host"
        reason = (f"worker died {attempts} times while running this job; last seen on host {where}"
                  + (f" (pid {job['pid']})" if job.get("pid") else "")
                  + f"; not delivered again (LABELLOOP_MAX_JOB_ATTEMPTS={limit})")
        log.error("job %s of project %s: %s", job["id"], job["project"], reason)
        return store.update(job["id"], state="failed", reason=reason, message="failed: its worker kept dying",
                            finished_at=time.time())
    store.update(job["id"], state="running", started_at=time.time(), attempts=attempts + 1,
                 worker=task.request.hostname or socket.gethostname(), pid=os.getpid(), message="starting")
    return None


def _prune(project: str) -> dict[str, Any]:
    """Registry retention after a training; a failure is reported in the job, never fails it."""
    from labelloop.core.registry import Registry

    env = settings()
    try:
        removed = Registry(env.model_dir).prune(project, keep_last=env.keep_versions)
    except Exception as exc:
        log.exception("pruning the registry of project %s failed", project)
        return {"prune_warning": f"old versions not pruned: {exc}"}
    return {"pruned": removed} if removed else {}


class Skip(Exception):
    """Raised by a job's work: nothing to do (the reason becomes the job's "skipped" reason)."""


def _run_locked_job(task, job_id: str, project: str, kind: str, version: str | None, lock_name: str,
                    work: Callable[[JobStore, dict[str, Any], Callable[[float, str], None]], dict[str, Any]]) -> dict[str, Any]:
    """The protocol every job that holds a project lock follows (training, warm start, predictions).

    A second delivery of an ended job ends at once; a busy lock puts the job back (its pending slot stays
    valid while it waits); once the lock is held the slot is released (new events make a new job), the
    record is re-read (another delivery may have ended it meanwhile), the attempt is counted, and
    ``work(store, job, progress)`` returns the fields of the finished record. ``Skip`` ends it as skipped,
    any other error as failed with its reason; the lock is renewed while ``work`` runs.
    """
    store = JobStore()
    job = store.get(job_id) or store.create(kind, project, job_id=job_id, version=version, trigger="direct")
    if job["state"] in FINISHED:
        return job  # a second delivery of a job that already ended
    lock = store.training_lock(project, job_id) if lock_name == "train" else store.prediction_lock(project, job_id)
    if not lock.acquire():
        store.renew_pending(project, job_id, kind, version)  # in a worker's hands: the slot it holds stays valid
        what = "prediction job" if lock_name == "predict" else "training"
        store.update(job_id, message=f"waiting: another {what} of project {project} is running")
        raise task.retry(countdown=LOCK_WAIT_S)
    heartbeat = _Heartbeat(lock)
    heartbeat.start()
    try:
        store.release_pending(project, job_id, kind, version)  # from now on, new events make a new pending job
        job = store.get(job_id) or job  # as it is now that this delivery holds the lock
        if job["state"] in FINISHED:
            return job
        ended = _start_attempt(task, store, job)
        if ended is not None:
            return ended
        try:
            fields = work(store, job, _progress(task, store, job_id))
        except Skip as exc:
            return store.update(job_id, state="skipped", reason=str(exc), message=str(exc), finished_at=time.time())
        except Exception as exc:
            log.exception("%s job %s of project %s failed", kind, job_id, project)
            return store.update(job_id, state="failed", reason=reason_of(exc), message="failed",
                                finished_at=time.time())
        return store.update(job_id, finished_at=time.time(), **fields)
    finally:
        heartbeat.stopped.set()
        lock.release()


@app.task(name="labelloop.train_project", bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def train_project(self, job_id: str, project: str) -> dict[str, Any]:
    """Train the project's next version from Label Studio's annotations; a promotion queues its predictions."""
    from labelloop.core.datasets import DatasetError
    from labelloop.workflows.pipeline import NothingNew, train_from_label_studio

    def work(store: JobStore, job: dict[str, Any], progress) -> dict[str, Any]:
        try:
            outcome = train_from_label_studio(project, progress, force=bool(job.get("force")))
        except (DatasetError, NothingNew) as exc:
            raise Skip(str(exc)) from exc
        follow_up: dict[str, Any] = {}
        if outcome.promoted:  # queued before this job reads "done", so the project never looks idle between
            try:
                follow_up["prediction_job"] = request_prediction(
                    project, outcome.manifest.version, trigger=f"promotion of {outcome.manifest.version}",
                    store=store, countdown=0)["id"]
            except Exception as exc:
                follow_up["warning"] = f"predictions not queued: {exc}"
        follow_up.update(_prune(project))
        return dict(state="done", progress=1.0, message=outcome.reason, reason=outcome.reason,
                    version=outcome.manifest.version, promoted=outcome.promoted, metrics=outcome.manifest.metrics,
                    compared_with=outcome.compared_with, **follow_up)

    return _run_locked_job(self, job_id, project, "train", None, "train", work)


@app.task(name="labelloop.predict_project", bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def predict_project(self, job_id: str, project: str, version: str) -> dict[str, Any]:
    """Push ``version``'s predictions for every task of the project without a human annotation
    (a trained version, or the base model's ``base-<stem>`` / ``custom-<stem>`` before any training)."""
    from labelloop.workflows.pipeline import NotServed, predict_unlabeled

    def work(store: JobStore, job: dict[str, Any], progress) -> dict[str, Any]:
        from labelloop.tasks.sharding import run_on_workers

        try:  # the backlog's chunks go to every free prediction worker, this one included
            counts = predict_unlabeled(project, version, progress, runner=run_on_workers(job_id, self.request.hostname or ""))
        except NotServed as exc:  # a base model's backlog overtaken by the first trained version
            raise Skip(str(exc)) from exc
        message = (f"{counts['pushed']} predictions of {version} pushed to Label Studio"
                   + (f"; {counts['errors']} task(s) without prediction" if counts["errors"] else ""))
        return dict(state="done", progress=1.0, message=message, counts=counts)

    return _run_locked_job(self, job_id, project, "predict", version, "predict", work)


@app.task(name="labelloop.warm_start_project", bind=True, max_retries=None, acks_late=True,
          reject_on_worker_lost=True)
def warm_start_project(self, job_id: str, project: str) -> dict[str, Any]:
    """Pretrain the project's warm start from its task images; under the training lock, so the first
    training waits for it instead of racing it."""
    from labelloop.workflows.pipeline import warm_start_from_label_studio

    def work(store: JobStore, job: dict[str, Any], progress) -> dict[str, Any]:
        result = warm_start_from_label_studio(project, progress)
        if result.get("skipped"):
            raise Skip(result["skipped"])
        message = f"warm start pretrained on {result['images']} images ({result['steps']} steps)"
        return dict(state="done", progress=1.0, message=message, reason=message, warm_start=result)

    return _run_locked_job(self, job_id, project, "warm-start", "-", "train", work)


def _count_attempt(task) -> None:
    """Folds and file chunks have no job record: a counter key per Celery task id (and try, for a task that
    retries) ends a redelivery loop — its worker dies on it every time — the way a job's attempts do."""
    from labelloop.tasks.jobstore import PREFIX, RECORD_TTL

    store = JobStore()
    key = f"{PREFIX}:attempts:{task.request.id}:{task.request.retries or 0}"
    pipe = store.r.pipeline()
    pipe.incr(key)
    pipe.expire(key, RECORD_TTL)
    attempts = int(pipe.execute()[0])
    limit = settings().max_job_attempts
    if attempts > limit:
        raise RuntimeError(f"its worker died {attempts - 1} times while running it; not run again "
                           f"(LABELLOOP_MAX_JOB_ATTEMPTS={limit})")


@app.task(name="labelloop.crossval_fold", bind=True, acks_late=True, reject_on_worker_lost=True)
def crossval_fold(self, project: str, folds: int, fold: int) -> dict[str, Any]:
    """One fold of out-of-sample scoring: train without the fold, predict the fold (train queue)."""
    from labelloop.labelstudio.client import read_labeled
    from labelloop.labelstudio.media import MediaFetcher
    from labelloop.workflows.pipeline import train_fold_and_predict

    _count_attempt(self)
    data = read_labeled(project)  # a fold trains and predicts labeled tasks only: no export of the whole project

    def report(fraction: float, message: str) -> None:
        self.update_state(state="PROGRESS", meta={"progress": fraction, "message": f"fold {fold}: {message}"})

    with MediaFetcher.from_settings() as fetcher:
        outputs = train_fold_and_predict(data.tasks, data.spec, fetcher, folds, fold, report)
    return {str(k): v for k, v in outputs.items()}


def run_folds_on_celery(project: int, folds: int, progress) -> dict[int, Any]:
    """A fold runner for out-of-sample scoring (labelloop.fo.analysis.FoldRunner): one
    ``crossval_fold`` job per fold on the training queue, so K workers train the K folds at once."""
    from celery import group

    from labelloop.workflows.pipeline import prediction_from_json

    result = group(crossval_fold.s(str(project), folds, k) for k in range(folds)).apply_async()
    while not result.ready():
        progress(result.completed_count() / folds, f"{result.completed_count()} of {folds} folds trained")
        time.sleep(1)
    merged: dict[int, Any] = {}
    for part in result.get(disable_sync_subtasks=False):
        merged.update({int(k): prediction_from_json(v) for k, v in part.items()})
    return merged


# -- FiftyOne predictions in chunks (labelloop.workflows.file_chunks) ---------------------------------------

FILE_CHUNK_ATTEMPTS = 3  # a chunk that fails is retried alone, then reported (its samples keep what they had)


@app.task(name="labelloop.predict_files", bind=True, acks_late=True, reject_on_worker_lost=True)
def predict_files(self, context: dict[str, Any], paths: list[Any]) -> list[Any]:
    """One chunk of a FiftyOne dataset's image files through a version (prediction queue): its predictions or
    embeddings as JSON, in order (``file_chunks.run_chunk``). The files must be on a volume this worker shares
    with the dataset."""
    from labelloop.errors import LabelloopError
    from labelloop.workflows.file_chunks import FilesContext, run_chunk

    _count_attempt(self)
    try:
        return run_chunk(FilesContext.from_json(context), paths)
    except (ValueError, LabelloopError):
        raise  # bad input or a model that cannot serve: another try would fail the same way
    except Exception as exc:  # an unreadable file, a worker short of memory: retried alone
        if self.request.retries + 1 >= FILE_CHUNK_ATTEMPTS:
            raise
        raise self.retry(exc=exc, countdown=1, max_retries=FILE_CHUNK_ATTEMPTS - 1) from exc


FILE_CHUNK_STALL_S = 600  # no chunk finished this long and no prediction worker answers: the rest is given up


def predict_files_on_celery(context, chunks: list[list[str]]):
    """A ``file_chunks.FilesRunner``: one ``predict_files`` task per chunk on the prediction queue, so every
    prediction worker takes chunks; yields ``(chunk index, outputs)`` as each finishes, or ``(chunk index,
    reason)`` for a chunk that failed every try, or that waited ``FILE_CHUNK_STALL_S`` with no prediction worker
    left. Closing the generator early revokes the chunks not finished; every result is removed from Redis."""
    from celery import group

    from labelloop.workflows.file_chunks import decode

    if not chunks:
        return
    result = group(predict_files.s(context.to_json(), chunk) for chunk in chunks).apply_async()
    pending = dict(enumerate(result.results))
    last_progress = time.monotonic()
    try:
        while pending:
            finished = [k for k, child in pending.items() if child.ready()]
            if not finished:
                if time.monotonic() - last_progress > FILE_CHUNK_STALL_S and not prediction_workers():
                    for k in sorted(pending):
                        yield k, f"no prediction worker took this chunk in {FILE_CHUNK_STALL_S} s"
                    return
                time.sleep(0.25)
                continue
            last_progress = time.monotonic()
            for k in finished:
                child = pending.pop(k)
                if child.successful():
                    outputs = decode(context, child.get(disable_sync_subtasks=False))
                    child.forget()
                    yield k, outputs
                else:
                    reason = child.result
                    child.forget()
                    yield k, reason_of(reason) if isinstance(reason, BaseException) else str(reason)
    finally:
        if pending:
            app.control.revoke([child.id for child in pending.values()])
            for child in pending.values():
                child.forget()


def prediction_workers(timeout: float = 1.0) -> list[str]:
    """Names of the running workers that take the prediction queue (none answers: an empty list)."""
    try:
        queues = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:  # no broker: nothing to hand chunks to
        log.info("no prediction worker: %s", exc)
        return []
    return sorted(name for name, consumed in queues.items() if any(q.get("name") == PREDICT_QUEUE for q in consumed))
