"""The Celery app: Redis broker and result backend, two queues, at-least-once delivery.

Queues (``labelloop.train``, ``labelloop.predict``) let ops run GPU workers for training and CPU
workers for prediction/scoring, on other machines, all on one Redis. Tasks are acknowledged only
when they finish (``acks_late``) and are handed back if their worker dies, so a SIGKILLed training
is delivered again; the job code makes a second delivery harmless (see jobs.py).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from labelloop.config import settings

TRAIN_QUEUE = "labelloop.train"
PREDICT_QUEUE = "labelloop.predict"


def make_app() -> Celery:
    env = settings()
    app = Celery("labelloop", broker=env.redis_url, backend=env.redis_url,
                 include=["labelloop.tasks.jobs", "labelloop.tasks.sharding"])
    app.conf.update(
        task_queues=[Queue(TRAIN_QUEUE), Queue(PREDICT_QUEUE)],
        task_default_queue=PREDICT_QUEUE,
        task_routes={
            "labelloop.train_project": {"queue": TRAIN_QUEUE},
            "labelloop.crossval_fold": {"queue": TRAIN_QUEUE},
            "labelloop.predict_project": {"queue": PREDICT_QUEUE},
            "labelloop.predict_chunks": {"queue": PREDICT_QUEUE},
            "labelloop.predict_files": {"queue": PREDICT_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a busy worker does not hoard jobs another worker could run
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        # A message unacknowledged this long (its worker died) goes back to the queue; longer than
        # the longest training, or a slow training would be delivered twice (harmless, but wasted).
        broker_transport_options={"visibility_timeout": env.visibility_timeout,
                                  "socket_connect_timeout": 1, "socket_timeout": 5},
        result_backend_transport_options={"socket_connect_timeout": 1, "socket_timeout": 5},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


app = make_app()
