"""Celery jobs: train a project's next version, push predictions for its unlabeled tasks.

Both are thin: the work is the engine's (labelloop.pipeline); a job adds the lock, the job record,
progress, and what happens next (a promotion enqueues a prediction job).

Delivery is at least once (acks_late; a killed worker's job is delivered again), so a job must be
safe to run twice: a finished job record ends a second delivery at once; a training waits for the
project lock, which a dead holder stops renewing; predictions already pushed for a version are
not pushed again; a registry version is written atomically, so a killed training leaves none.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from labelloop.tasks.celery_app import PREDICT_QUEUE, TRAIN_QUEUE, app
from labelloop.tasks.jobstore import FINISHED, LOCK_TTL, JobStore

log = logging.getLogger(__name__)

LOCK_WAIT_S = 5  # a training waiting for its project's lock looks again this often
# Annotation events start their training a few seconds late: Label Studio sends the webhook while it
# is still saving (the export may not show the annotation yet), and a labeler's next saves join it.
DEBOUNCE_S = 5


# -- what the service calls (fast: one or two Redis round trips) -------------------------------------

def request_training(project: str, trigger: str, force: bool = False,
                     store: JobStore | None = None) -> tuple[dict[str, Any], bool]:
    """(job, created): enqueue a training of ``project`` or join the one already pending."""
    store = store or JobStore()
    job, created = store.claim_pending(str(project), trigger, force)
    if created:
        try:
            train_project.apply_async(args=[job["id"], str(project)], task_id=job["id"], queue=TRAIN_QUEUE,
                                      countdown=0 if force else DEBOUNCE_S, retry=False)
        except Exception as exc:
            store.release_pending(str(project), job["id"])
            store.update(job["id"], state="failed", reason=f"could not enqueue: {exc}", finished_at=time.time())
            raise
    return job, created


def request_prediction(project: str, version: str, trigger: str, store: JobStore | None = None) -> dict[str, Any]:
    store = store or JobStore()
    job = store.create("predict", str(project), version=version, trigger=trigger)
    predict_project.apply_async(args=[job["id"], str(project), version], task_id=job["id"], queue=PREDICT_QUEUE,
                                retry=False)
    return job


# -- the jobs -------------------------------------------------------------------------------------------

class _Heartbeat(threading.Thread):
    """Renews the project lock while the training runs; stops when told or when the lock is lost."""

    def __init__(self, lock):
        super().__init__(daemon=True)
        self.lock, self.stopped = lock, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(LOCK_TTL / 4):
            if not self.lock.renew():
                log.error("lost the training lock %s", self.lock.key)
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


@app.task(name="labelloop.train_project", bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def train_project(self, job_id: str, project: str) -> dict[str, Any]:
    from labelloop.pipeline import NothingNew, train_project as train_from_label_studio
    from labelloop.datasets import DatasetError

    store = JobStore()
    job = store.get(job_id) or store.create("train", project, job_id=job_id, trigger="direct")
    if job["state"] in FINISHED:
        return job  # a second delivery of a job that already ended
    lock = store.training_lock(project, job_id)
    if not lock.acquire():
        store.update(job_id, message=f"waiting: another training of project {project} is running")
        raise self.retry(countdown=LOCK_WAIT_S)
    heartbeat = _Heartbeat(lock)
    heartbeat.start()
    try:
        store.release_pending(project, job_id)  # from now on, new events make a new pending job
        job = store.update(job_id, state="running", started_at=time.time(), attempts=int(job.get("attempts", 0)) + 1,
                           worker=socket.gethostname(), message="starting")
        try:
            outcome = train_from_label_studio(project, _progress(self, store, job_id), force=bool(job.get("force")))
        except (DatasetError, NothingNew) as exc:
            return store.update(job_id, state="skipped", reason=str(exc), message=str(exc), finished_at=time.time())
        except Exception as exc:
            from labelloop.pipeline import training_error_reason

            log.exception("training job %s of project %s failed", job_id, project)
            return store.update(job_id, state="failed", reason=training_error_reason(exc), message="failed",
                                finished_at=time.time())
        follow_up: dict[str, Any] = {}
        if outcome.promoted:  # queued before this job reads "done", so the project never looks idle between
            try:
                follow_up["prediction_job"] = request_prediction(
                    project, outcome.manifest.version, trigger=f"promotion of {outcome.manifest.version}",
                    store=store)["id"]
            except Exception as exc:
                follow_up["warning"] = f"predictions not queued: {exc}"
        return store.update(job_id, state="done", progress=1.0, message=outcome.reason, reason=outcome.reason,
                            version=outcome.manifest.version, promoted=outcome.promoted,
                            metrics=outcome.manifest.metrics, compared_with=outcome.compared_with,
                            finished_at=time.time(), **follow_up)
    finally:
        heartbeat.stopped.set()
        lock.release()


@app.task(name="labelloop.predict_project", bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def predict_project(self, job_id: str, project: str, version: str) -> dict[str, Any]:
    from labelloop.pipeline import predict_unlabeled, training_error_reason

    store = JobStore()
    job = store.get(job_id) or store.create("predict", project, job_id=job_id, version=version, trigger="direct")
    if job["state"] in FINISHED:
        return job
    store.update(job_id, state="running", started_at=time.time(), attempts=int(job.get("attempts", 0)) + 1,
                 worker=socket.gethostname(), message="starting")
    try:
        counts = predict_unlabeled(project, version, _progress(self, store, job_id))
    except Exception as exc:
        log.exception("prediction job %s of project %s failed", job_id, project)
        return store.update(job_id, state="failed", reason=training_error_reason(exc), message="failed",
                            finished_at=time.time())
    message = (f"{counts['pushed']} predictions of {version} pushed to Label Studio"
               + (f"; {counts['errors']} task(s) without prediction" if counts["errors"] else ""))
    return store.update(job_id, state="done", progress=1.0, message=message, counts=counts, finished_at=time.time())


@app.task(name="labelloop.crossval_fold", bind=True, acks_late=True, reject_on_worker_lost=True)
def crossval_fold(self, project: str, folds: int, fold: int) -> dict[str, Any]:
    """One fold of out-of-sample scoring: train without the fold, predict the fold (train queue)."""
    from labelloop.labelconfig import parse_label_config
    from labelloop.media import MediaFetcher
    from labelloop.pipeline import train_fold_and_predict
    from labelloop.studio import StudioClient

    client = StudioClient.from_settings()
    try:
        spec = parse_label_config(client.project(project)["label_config"])
        tasks = client.export_tasks(project)
    finally:
        client.close()

    def report(fraction: float, message: str) -> None:
        self.update_state(state="PROGRESS", meta={"progress": fraction, "message": f"fold {fold}: {message}"})

    return {str(k): v for k, v in train_fold_and_predict(tasks, spec, MediaFetcher.from_settings(), folds, fold,
                                                         report).items()}
