"""The engine: task kinds, label config, datasets, training, inference, scoring, registry.

Nothing here speaks HTTP, the Label Studio API, FiftyOne or Celery; every face calls down into it.
"""
