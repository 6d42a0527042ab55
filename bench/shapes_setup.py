"""What the classification benchmarks share: the demo's label config, a local-file fetcher, a registry
in the run's work folder and the fixed clean test set (150 shapes of the run's style, 'simple' by default, seed 999)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ClassificationBench:
    spec: Any  # ControlSpec of label_config("classification")
    fetcher: Any  # LocalFileFetcher
    registry: Any  # Registry under work/models
    test_paths: list[Path]
    test_labels: list[str]


def classification_bench(work: Path, size: int, test_images: int, style: str = "simple") -> ClassificationBench:
    """Call after LABELLOOP_HOME / YOLO_CONFIG_DIR are set (labelloop reads them at import)."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.dev.shapes import generate_shapes, label_config
    from labelloop.labelstudio.media import LocalFileFetcher

    test = generate_shapes(work / "test", n=test_images, seed=999, size=size, max_objects=1, style=style)
    return ClassificationBench(spec=parse_label_config(label_config("classification")), fetcher=LocalFileFetcher(),
                               registry=Registry(work / "models"),
                               test_paths=[test.images_dir / im.file for im in test.images],
                               test_labels=[im.label for im in test.images])
