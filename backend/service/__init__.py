"""The HTTP face: the Label Studio ML backend API (FastAPI app, request models, Prometheus metrics)."""
