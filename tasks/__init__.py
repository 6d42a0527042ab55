"""Celery jobs (training, prediction, scoring) — see the Celery issue; the engine lives in backend/."""
