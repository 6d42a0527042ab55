"""The ops CLI's pure logic: exit codes, the versions table's statuses and reasons, Label Studio's connect
errors read as one line. (The commands against the real processes: tests/test_cli_ops.py.)"""

from __future__ import annotations

import pytest

from labelloop.cli import NotFound, Unreachable, exit_code_of, version_rows
from labelloop.core.registry import Registry, RegistryError
from labelloop.errors import LabelloopError
from labelloop.labelstudio.client import StudioError, _validation_message

pytestmark = pytest.mark.unit


def test_exit_codes_say_unreachable_2_not_found_3_else_1():
    assert exit_code_of(StudioError("Label Studio at x unreachable")) == 2  # no HTTP status: no answer
    assert exit_code_of(StudioError("answered 401", 401)) == 2
    assert exit_code_of(StudioError("no project 9", 404)) == 3
    assert exit_code_of(RegistryError("project 3 has no version 'p3-v9'")) == 3
    assert exit_code_of(NotFound("no versions")) == 3
    assert exit_code_of(Unreachable("Redis does not answer")) == 2
    assert exit_code_of(StudioError("answered 400", 400)) == 1
    assert exit_code_of(LabelloopError("anything else")) == 1


def _version(registry: Registry, tmp_path, parent: str | None, primary: float) -> str:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not really weights")
    return registry.add_version("7", weights, {"parent": parent, "task": "classify", "task_type": "classification",
                                               "classes": ["a", "b"], "metrics": {"top1": primary,
                                                                                  "primary": primary}}).version


def test_version_rows_newest_first_with_status_and_the_recorded_reason(tmp_path):
    registry = Registry(tmp_path / "models")
    v1 = _version(registry, tmp_path, None, 0.5)
    registry.promote("7", v1, "p7-v1 promoted: first version")
    v2 = _version(registry, tmp_path, v1, 0.4)  # kept out: never promoted, no later version names it
    v3 = _version(registry, tmp_path, v1, 0.7)
    registry.promote("7", v3, "p7-v3 promoted: 0.700 >= 0.500")
    v4 = _version(registry, tmp_path, v3, 0.6)
    registry.promote_by_hand("7", v4, reason="promoted by hand (labelloop promote)", by="cli")
    v5 = _version(registry, tmp_path, v4, 0.1)
    registry.promote_by_hand("7", v3, reason="rollback from p7-v4", by="cli")
    jobs = [{"kind": "train", "state": "done", "version": v5, "promoted": False, "created_at": 5,
             "reason": "p7-v5 kept out of service: 0.100 < 0.600 of p7-v4"},
            {"kind": "predict", "state": "done", "version": v2, "created_at": 6}]  # not a training: no reason

    rows = version_rows(registry, "7", jobs)
    assert [r["version"] for r in rows] == [v5, v4, v3, v2, v1]
    by = {r["version"]: r for r in rows}
    assert [r["version"] for r in rows if r["serving"]] == [v3]
    assert by[v3]["status"] == "serving" and by[v3]["reason"] == "rollback from p7-v4"
    assert by[v5]["status"] == "kept out" and "0.100 < 0.600" in by[v5]["reason"]  # the gate's own sentence
    assert by[v4]["status"] == "promoted by hand" and "labelloop promote" in by[v4]["reason"]
    assert by[v2]["status"] == "kept out"  # from the lineage: no version was trained while it served
    assert by[v1]["status"] == "promoted"  # from the lineage: p7-v2 and p7-v3 were trained while it served
    assert by[v3]["metric"] == "top1" and by[v3]["value"] == pytest.approx(0.7)
    assert all(r["date"].endswith("UTC") for r in rows)


def test_label_studio_connect_refusal_reads_as_one_plain_line():
    raw = ('Label Studio answered 400 to POST /api/ml: {"validation_errors":{"non_field_errors":["Can\'t connect '
           'to ML backend http://x:9090, health check failed. <a href=\\"https://labelstud.io/guide/ml.html\\">'
           'Learn more</a> about how to set up an ML backend."]}}')
    line = _validation_message(raw)
    assert line.startswith("Can't connect to ML backend http://x:9090, health check failed.")
    assert "<a" not in line and "\n" not in line and "Learn more about" in line
    assert _validation_message("Label Studio answered 400 to POST /api/ml: plain words") == "plain words"
