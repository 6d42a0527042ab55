"""What a human said about one image, in the engine's terms: a class, or regions in image fractions.

Label Studio's JSON (percent coordinates, rotated rectangles, one result item per region) is read into
these in one place (``labelloop.labelstudio.results``); the engine (datasets, fingerprints, FiftyOne
ground truth) works only with these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TruthRegion:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 as fractions of the image width / height, clipped to [0, 1]
    polygon: tuple[tuple[float, float], ...] = ()  # segmentation: the outline, fractions of the image, clipped


@dataclass(frozen=True)
class LabeledImage:
    """The latest human annotation of one task, for the control the model serves."""

    task_id: int | str
    annotation: str  # "<annotation id>:<updated_at>": what changed since a version was trained
    label: str | None = None  # classification: the chosen class
    regions: tuple[TruthRegion, ...] = ()  # detection / segmentation (empty: an image with nothing in it)


def truth_to_json(truth: LabeledImage) -> dict:
    """``truth`` as plain JSON (for a chunk of work that another worker scores)."""
    return {"task_id": truth.task_id, "annotation": truth.annotation, "label": truth.label,
            "regions": [{"label": r.label, "box": list(r.box), "polygon": [list(p) for p in r.polygon]}
                        for r in truth.regions]}


def truth_from_json(data: dict) -> LabeledImage:
    """The inverse of ``truth_to_json``."""
    regions = tuple(TruthRegion(str(r["label"]), tuple(float(v) for v in r["box"]),  # type: ignore[arg-type]
                                tuple((float(x), float(y)) for x, y in r.get("polygon") or ()))
                    for r in data.get("regions") or ())
    return LabeledImage(data["task_id"], str(data["annotation"]), data.get("label"), regions)
