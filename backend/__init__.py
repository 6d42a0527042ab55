"""labelloop: the data developer's loop around an ultralytics YOLO model.

backend/ (this package, imported as ``labelloop``) is the engine and the Label Studio face;
tasks/ (``labelloop.tasks``) holds the Celery jobs; fiftyone_plugins/ the analyst face.
"""

__version__ = "0.1.0"
