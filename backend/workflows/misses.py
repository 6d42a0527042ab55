"""The model's misses where labelers work: unlabeled tasks whose rough labels (``core/negatives.py``: the
task data's ``contains`` / ``counts``) disagree with the served version's predictions, worst first, in the
Data Manager tab **"labelloop: model misses"**. The labeler's boxes on them train the next version.

Run by the prediction job of the served version, from the predictions it holds (no second inference).
"""

from __future__ import annotations

from typing import Any

from labelloop.core.labelconfig import ControlSpec
from labelloop.core.negatives import RoughLabels, miss_score, rough_labels

MISSES_TAB = "labelloop: model misses"
MISSES_SIZE = 50


def shown_labels(result: list[dict[str, Any]] | None, spec: ControlSpec) -> list[str]:
    """One label per region the prediction offers for ``spec``'s control (classification: the chosen classes)."""
    out: list[str] = []
    for item in result or []:
        if item.get("from_name") != spec.from_name:
            continue
        values = (item.get("value") or {}).get("choices" if spec.kind.whole_image else spec.result_type)
        if isinstance(values, list):
            out += [str(v) for v in values]
    return out


def rank_misses(tasks: list[dict[str, Any]], results: dict[int, list[dict[str, Any]]],
                spec: ControlSpec) -> list[tuple[int, float, dict[str, Any]]]:
    """(task id, score, what disagrees) for every predicted task with rough labels the prediction contradicts,
    worst first."""
    return _ranked({int(t["id"]): rough_labels(t.get("data"), spec.labels) for t in tasks}, results, spec)


def _ranked(rough: dict[int, RoughLabels], results: dict[int, list[dict[str, Any]]],
            spec: ControlSpec) -> list[tuple[int, float, dict[str, Any]]]:
    ranked = []
    for task_id, labels in rough.items():
        if task_id not in results or not labels.given:
            continue
        score, details = miss_score(shown_labels(results[task_id], spec), labels)
        if score > 0:
            ranked.append((task_id, score, details))
    return sorted(ranked, key=lambda r: (-r[1], r[0]))


def refresh_misses(client, project_id: int | str, spec: ControlSpec, rough: dict[int, RoughLabels],
                   results: dict[int, list[dict[str, Any]]]) -> dict[str, int] | None:
    """Rewrite the misses tab from the served version's predictions (``rough``: task id → its rough labels, for the
    tasks that carry some; ``results``: task id → result list); None (nothing written) when no task carries any."""
    given = sum(1 for labels in rough.values() if labels.given)
    if not given:
        return None
    ranked = _ranked(rough, results, spec)
    client.put_tab(project_id, MISSES_TAB, [task_id for task_id, _, _ in ranked[:MISSES_SIZE]])
    return {"with_rough_labels": given, "misses": len(ranked)}
