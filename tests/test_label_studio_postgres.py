"""The prediction job against Label Studio on PostgreSQL, as the Compose stack runs it (the rest of the suite runs
Label Studio on its default SQLite): the paged read and its filters, the bulk prediction push, the Data Manager's
score ordering, both tabs and the suspects' task meta (set on the tab's tasks, taken back from a task that left
it), through one real Label Studio 1.23.2 on a real PostgreSQL
server (``LABELLOOP_TEST_POSTGRES``, default the local ``postgresql://postgres@127.0.0.1:5432``; the test is
skipped, saying so, where none answers). A fresh database is created for the module and dropped after it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from urllib.parse import urlsplit

import pytest

from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_result

pytestmark = pytest.mark.e2e

SERVER = os.environ.get("LABELLOOP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def ls_on_postgres(tmp_path_factory, run_home):
    from labelloop.dev.labeler import LabelerClient
    from labelloop.dev.localstack import create_postgres_database, drop_postgres_database, start_label_studio

    if not _answers(SERVER):
        pytest.skip(f"no PostgreSQL server at {SERVER} (set LABELLOOP_TEST_POSTGRES)")
    database = create_postgres_database(SERVER, f"labelloop_test_{os.getpid()}")
    try:
        studio = start_label_studio(tmp_path_factory.mktemp("label-studio-pg"), postgres=database)
        try:
            with LabelerClient(studio.url, studio.info["token"]) as api:
                yield studio, api
        finally:
            studio.stop()
    finally:
        drop_postgres_database(database)


def test_the_prediction_job_on_label_studio_with_postgresql(ls_on_postgres, simple_classifier, tmp_path):
    from labelloop.config import settings
    from labelloop.core.registry import Registry
    from labelloop.workflows.pipeline import LABEL_NEXT_TAB, predict_unlabeled
    from labelloop.workflows.suspects import META_KEY, SUSPECTS_TAB

    studio, api = ls_on_postgres
    manifest, _, _ = simple_classifier
    data_dir = studio.log.parent  # SQLite would have made its file there: this server is on PostgreSQL
    assert not list(data_dir.glob("*.sqlite3")), list(data_dir.iterdir())
    images = generate_shapes(tmp_path / "images", n=24, seed=41, size=64, max_objects=1, style="simple")
    project = api.create_project("on postgres", label_config("classification"))["id"]
    tasks = api.upload_images(project, [images.images_dir / im.file for im in images.images])
    image_of = {t["id"]: next(im for im in images.images if t["data"]["image"].endswith(im.file)) for t in tasks}
    labeled, unlabeled = tasks[:8], {t["id"] for t in tasks[8:]}
    api.set_task_meta(labeled[0]["id"], {"source": "camera-7"})  # the user's own meta, kept
    wrong = labeled[0]["id"]  # a labeling mistake: the model must put it among the suspects
    annotations = {}
    for task in labeled:
        result = to_label_studio_result(image_of[task["id"]], "classification")
        if task["id"] == wrong:
            truth = result[0]["value"]["choices"][0]
            result[0]["value"]["choices"] = [next(c for c in ("circle", "square", "triangle", "star") if c != truth)]
        annotations[task["id"]] = api.annotate(task["id"], result)
    before = {t["id"]: t["annotations"] for t in api.tasks(project)}

    env = dataclasses.replace(settings(), label_studio_url=studio.url, label_studio_api_key=studio.info["token"],
                              model_dir=tmp_path / "models")
    registry = Registry(env.model_dir)
    keep = {k: v for k, v in manifest.to_json().items()
            if k not in ("version", "project", "created_at", "weights_sha256", "weights", "path")}
    first, second = (registry.add_version(project, manifest.weights, keep).version for _ in range(2))
    registry.promote(project, first, "test")
    counts = predict_unlabeled(project, first, env=env)
    assert counts["pushed"] == len(unlabeled) and counts["errors"] == 0, counts

    predictions = [p for p in api.predictions(project) if p["model_version"] == first]
    assert {p["task"] for p in predictions} == unlabeled
    assert api.project(project)["model_version"] == first
    scores = {p["task"]: p["score"] for p in predictions}
    ordered = [t["id"] for t in api.tasks(project, ordering=["tasks:predictions_score"]) if t["id"] in scores]
    assert [scores[t] for t in ordered] == sorted(scores.values())
    views = {v["data"].get("title"): v["id"] for v in api.request("GET", "/api/dm/views", params={"project": project})}
    assert {t["id"] for t in api.tab_tasks(project, views[LABEL_NEXT_TAB])} <= unlabeled
    in_tab = {t["id"] for t in api.tab_tasks(project, views[SUSPECTS_TAB])}
    assert wrong in in_tab and counts["scored"] == len(labeled) and counts["suspects"] == len(in_tab), counts
    now = {t["id"]: t for t in api.tasks(project)}
    entries = {i: t["meta"][META_KEY] for i, t in now.items() if META_KEY in (t["meta"] or {})}
    assert set(entries) == in_tab and all(e["mislabel_suspect"] and e["version"] == first for e in entries.values())
    assert now[wrong]["meta"]["source"] == "camera-7"

    # the labeler corrects the mistake; the next version's job takes its entry back and keeps the user's key
    fixed = to_label_studio_result(image_of[wrong], "classification")
    api.request("PATCH", f"/api/annotations/{annotations[wrong]['id']}", json={"result": fixed})
    registry.promote(project, second, "test")
    counts = predict_unlabeled(project, second, env=env)
    now = {t["id"]: t for t in api.tasks(project)}
    in_tab = {t["id"] for t in api.tab_tasks(project, views[SUSPECTS_TAB])}
    assert wrong not in in_tab, counts
    assert now[wrong]["meta"] == {"source": "camera-7"}
    entries = {i: t["meta"][META_KEY] for i, t in now.items() if META_KEY in (t["meta"] or {})}
    assert set(entries) == in_tab and all(e["version"] == second for e in entries.values())
    # nothing a human made was touched but the one correction the labeler made
    after = {t["id"]: t["annotations"] for t in api.tasks(project)}
    assert {i: a for i, a in after.items() if i != wrong} == {i: a for i, a in before.items() if i != wrong}


@pytest.mark.unit
def test_database_settings_come_from_one_url_and_names_are_checked():
    from labelloop.dev.localstack import _database_name, postgres_env

    assert postgres_env("postgresql://ls:p%40ss@db.internal:6543/labels") == {
        "DJANGO_DB": "default", "POSTGRE_HOST": "db.internal", "POSTGRE_PORT": "6543", "POSTGRE_USER": "ls",
        "POSTGRE_PASSWORD": "p@ss", "POSTGRE_NAME": "labels"}
    assert postgres_env("postgres://127.0.0.1/x")["POSTGRE_USER"] == "postgres"
    for bad in ("mysql://root@127.0.0.1/x", "postgresql://127.0.0.1", "postgresql:///x"):
        with pytest.raises(ValueError):
            postgres_env(bad)
    assert _database_name("labelloop_test_42") == "labelloop_test_42"
    for bad in ('x"; DROP TABLE y; --', "x?sslmode=require", "", "a" * 64, "é"):
        with pytest.raises(ValueError):
            _database_name(bad)
