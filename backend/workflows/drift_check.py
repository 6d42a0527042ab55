"""Incoming tasks against the training set (``core/drift.py``), where labelers and ops see it.

Run by the prediction job of the version in service: the tasks imported after that version was trained
(unlabeled, newer than its manifest) are compared with the labeled tasks it learned from, in what the
model sees and in the pixels. The report goes to ``MODEL_DIR/projects/<id>/drift.json`` (the service
exports it as Prometheus gauges) and the incoming tasks beyond the training set's usual distance, farthest
first, to the Data Manager tab **"labelloop: out of distribution"** — what to label next, since the model
has not seen their like.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import zlib
from pathlib import Path
from typing import Any

from labelloop.core import drift
from labelloop.core.registry import Manifest, Registry

log = logging.getLogger(__name__)

DRIFT_TAB = "labelloop: out of distribution"
DRIFT_FILE = "drift.json"
TAB_SIZE = 50
REFERENCE_SAMPLE = 300  # labeled tasks compared with (a stable sample by task id beyond that)
MIN_REFERENCE = 5


def created_after(task: dict[str, Any], moment: float) -> bool:
    """Whether Label Studio created the task after ``moment`` (epoch seconds)."""
    raw = task.get("created_at")
    if not isinstance(raw, str) or len(raw) > 40:
        return False
    try:
        created = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return False
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.timezone.utc)
    return created.timestamp() > moment


def _sample(task_ids: list[int], n: int) -> list[int]:
    """At most ``n`` ids, the same ones every time (a hash of the id), so reports compare."""
    return sorted(task_ids, key=lambda t: zlib.crc32(str(t).encode()))[:n]


def check_incoming(client, registry: Registry, project_id: int | str, manifest: Manifest, model, tasks, labeled_ids,
                   fetch_paths, url_of) -> dict[str, Any] | None:
    """The drift report of the tasks imported after ``manifest``'s version, written and tabbed; None when there
    are none (or too few labeled tasks to compare with). ``fetch_paths``: urls → local files (errors skipped)."""
    incoming = [t["id"] for t in tasks if t["id"] not in labeled_ids and created_after(t, manifest.created_at)]
    if not incoming or len(labeled_ids) < MIN_REFERENCE:
        return None
    incoming = sorted(incoming)[-drift.MAX_INCOMING:]
    reference = _sample(sorted(labeled_ids), REFERENCE_SAMPLE)
    ref_files = dict(zip(reference, fetch_paths([url_of[t] for t in reference])))
    inc_files = dict(zip(incoming, fetch_paths([url_of[t] for t in incoming])))
    ref_ok = [t for t in reference if isinstance(ref_files[t], Path)]
    inc_ok = [t for t in incoming if isinstance(inc_files[t], Path)]
    if len(ref_ok) < MIN_REFERENCE or not inc_ok:
        return None
    views = drift.drift_views(model, [ref_files[t] for t in ref_ok], [inc_files[t] for t in inc_ok])
    beyond = [(inc_ok[i], ratio) for i, ratio in views["farthest"] if ratio > 1.0][:TAB_SIZE]
    report = {"project": str(project_id), "version": manifest.version, "checked_at": time.time(),
              "drifted": views["drifted"], "views": views["views"], "incoming": len(inc_ok), "reference": len(ref_ok),
              "beyond": [{"task": t, "ratio": round(r, 3)} for t, r in beyond]}
    _write(registry.project_dir(project_id) / DRIFT_FILE, report)
    client.put_tab(project_id, DRIFT_TAB, [t for t, _ in beyond], ordering=("tasks:id",))
    if views["drifted"]:
        log.warning("project %s: %d new task(s) drifted from the training set (%s)", project_id, len(inc_ok),
                    ", ".join(f"{name} {v['share_beyond']:.0%} beyond" for name, v in views["views"].items()))
    return {"drifted": views["drifted"], "incoming": len(inc_ok), "beyond": len(beyond),
            **{f"{name}_share_beyond": round(v["share_beyond"], 3) for name, v in views["views"].items()}}


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)


def report_of(registry: Registry, project: int | str) -> dict[str, Any] | None:
    """The project's last drift report, or None."""
    try:
        return json.loads((registry.project_dir(project) / DRIFT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def latest_reports(registry: Registry) -> list[dict[str, Any]]:
    """Every project's last drift report (for /metrics)."""
    out = []
    for project in registry.projects():
        path = registry.project_dir(project) / DRIFT_FILE
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out
