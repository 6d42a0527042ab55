"""The ops CLI against the real processes: Label Studio 1.23.2, Redis, `labelloop serve` (basic auth and
the webhook secret on, a base model served before any training) and a `labelloop worker` on both queues.

`labelloop connect` (idempotent, the secret header, uncertainty sampling, the model version, the one
backlog prediction a base model's project gets at /setup), `labelloop train` through the webhooks'
queue, slot and lock (START_TRAINING joins it), `labelloop predict`, `versions | promote | rollback`
sharing the API's promotion, and the one-line errors with their exit codes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from conftest import install_model, wait_for

from labelloop.core.registry import Registry
from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_result

pytestmark = pytest.mark.e2e

USER, PASSWORD, SECRET = "ops", "ops-password", "ops-webhook-secret"
AUTH = (USER, PASSWORD)
BASE = "base-shapes-cls"  # the version name /setup gives LABELLOOP_BASE_MODEL=.../shapes-cls.pt


@pytest.fixture(scope="module")
def ops(tmp_path_factory, label_studio, redis_server, trained):
    """A backend and a worker sharing one LABELLOOP_HOME, and the environment the CLI runs with."""
    from labelloop.dev.localstack import start_backend, start_worker

    home = tmp_path_factory.mktemp("ops-home")
    base = home / "shapes-cls.pt"
    shutil.copyfile(trained("classification").weights, base)
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.info["token"],
           "YOLO_CONFIG_DIR": os.environ["YOLO_CONFIG_DIR"], "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
           "LABELLOOP_WEBHOOK_SECRET": SECRET, "LABELLOOP_BASE_MODEL": str(base), "LABELLOOP_EPOCHS": "2",
           "LABELLOOP_HOME": str(home)}
    backend = start_backend(home, env=env)
    try:
        worker = start_worker(home, env=env)
    except Exception:
        backend.stop()
        raise
    yield {"home": home, "env": env, "backend": backend, "url": backend.url, "registry": Registry(home / "models")}
    worker.stop()
    backend.stop()


def cli(ops, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **ops["env"], **extra}
    return subprocess.run([sys.executable, "-m", "labelloop.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """stderr holds one `labelloop: …` line and no traceback (tqdm's bar aside)."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.startswith("labelloop: ")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def jobs_of(ops, project: int) -> list[dict]:
    return httpx.get(f"{ops['url']}/jobs", params={"project": project, "limit": 500}, auth=AUTH).json()["jobs"]


def project_with_images(ls_api, tmp_path_factory, title: str, n: int, seed: int, config: str | None = None):
    images = generate_shapes(tmp_path_factory.mktemp(title.replace(" ", "-")), n=n, seed=seed, max_objects=1)
    project = ls_api.create_project(title, config or label_config("classification"))["id"]
    tasks = ls_api.upload_images(project, [images.images_dir / im.file for im in images.images])
    truth = {t["id"]: to_label_studio_result(next(im for im in images.images if t["data"]["image"].endswith(im.file)),
                                             "classification") for t in tasks}
    return project, tasks, truth


def predictions_of(ls_api, project: int, version: str) -> list[dict]:
    return [p for p in ls_api.predictions(project) if p["model_version"] == version]


def test_connect_is_idempotent_secures_the_webhook_and_a_base_model_backlogs_once(ops, ls_api, tmp_path_factory,
                                                                                  redis_server):
    from labelloop.tasks.jobstore import connect

    project, tasks, truth = project_with_images(ls_api, tmp_path_factory, "ops connect", 12, seed=31)
    first = cli(ops, "connect", "--project", str(project), "--backend-url", ops["url"])
    assert first.returncode == 0, first.stderr
    assert f"ML backend {ops['url']}: connected" in first.stdout and "basic auth" in first.stdout
    assert "with the X-Labelloop-Webhook-Secret header" in first.stdout
    assert "set to Uncertainty sampling" in first.stdout
    # no prediction of the base model's version exists yet (the backlog job starts 5 s after /setup), so
    # Label Studio refuses it as model version and connect says who sets it
    assert f"until Label Studio holds predictions of {BASE}" in first.stdout or \
        f"set to {BASE}" in first.stdout, first.stdout

    backends = ls_api.ml_backends(project)
    assert [(b["url"], b["auth_method"], b["basic_auth_user"]) for b in backends] == [(ops["url"], "BASIC_AUTH", USER)]
    assert backends[0]["model_version"] == BASE  # Label Studio called our /setup, with the basic auth
    hooks = ls_api.webhooks(project)
    assert [h["url"] for h in hooks] == [f"{ops['url']}/webhook"]
    assert hooks[0]["headers"]["X-Labelloop-Webhook-Secret"] == SECRET
    assert ls_api.project(project)["sampling"] == "Uncertainty sampling"

    # /setup of a project the base model serves queued its backlog: every task gets BASE's prediction,
    # and the job makes BASE the project's model version (what the Data Manager's score column reads)
    backlog = wait_for(lambda: [j for j in jobs_of(ops, project) if j["kind"] == "predict" and j["state"] == "done"],
                       300, "the backlog prediction job")
    assert [(j["version"], j["trigger"], j["counts"]["pushed"]) for j in backlog] == [(BASE, "setup", len(tasks))]
    # the job's record says where its time went (ops read it when a job is slow)
    phases = backlog[0]["counts"]["seconds"]
    assert {"backlog", "read_labeled", "model_version"} <= set(phases) and all(v >= 0 for v in phases.values()), phases
    assert sorted(p["task"] for p in predictions_of(ls_api, project, BASE)) == sorted(t["id"] for t in tasks)
    assert ls_api.project(project)["model_version"] == BASE

    second = cli(ops, "connect", "--project", str(project), "--backend-url", ops["url"])
    assert second.returncode == 0, second.stderr
    assert "already connected" in second.stdout and f"model version: {BASE} already" in second.stdout
    assert "webhook" in second.stdout and "unchanged" in second.stdout
    assert len(ls_api.ml_backends(project)) == 1 and len(ls_api.webhooks(project)) == 1
    time.sleep(3)  # the second /setup's backlog request (background) has long had its answer
    assert len([j for j in jobs_of(ops, project) if j["kind"] == "predict"]) == 1, "the backlog ran twice"
    # "once" lives in Redis, not in the backend process: a restarted or second backend asks in vain
    from labelloop.tasks.jobs import request_backlog_prediction
    from labelloop.tasks.jobstore import JobStore

    assert request_backlog_prediction(str(project), BASE, "another backend's /setup",
                                      JobStore(connect(redis_server.url))) is None
    assert len([j for j in jobs_of(ops, project) if j["kind"] == "predict"]) == 1

    # the webhook Label Studio sends on a save carries the secret now: the backend takes it as authenticated
    ls_api.annotate(tasks[0]["id"], truth[tasks[0]["id"]])
    seen = wait_for(lambda: [e for e in httpx.get(f"{ops['url']}/events", params={"project": project},
                                                  auth=AUTH).json()["events"] if e["action"] == "ANNOTATION_CREATED"],
                    30, "Label Studio's ANNOTATION_CREATED webhook")
    assert seen[0]["authenticated"] is True and seen[0]["task"] == tasks[0]["id"]

    # `labelloop predict` names the base model's version too; nothing is pushed twice
    again = cli(ops, "predict", "--project", str(project), "--wait", "--timeout", "240")
    assert again.returncode == 0, again.stderr
    done = json.loads(again.stdout[again.stdout.index("{"):])
    assert done["state"] == "done" and done["counts"]["pushed"] == 0
    # the backlog is the tasks without an annotation: the one just annotated left it (its prediction stays)
    assert done["counts"]["already_there"] == done["counts"]["unlabeled"] == len(tasks) - 1
    assert len(predictions_of(ls_api, project, BASE)) == len(tasks)


def test_cli_train_takes_the_webhooks_slot_and_lock_and_start_training_joins_it(ops, ls_api, tmp_path_factory,
                                                                              redis_server):
    from labelloop.tasks.jobstore import JobStore, connect

    project, tasks, truth = project_with_images(ls_api, tmp_path_factory, "ops train", 12, seed=32)
    for task in tasks[:10]:  # before connecting: the backend ignores events of projects it does not know
        ls_api.annotate(task["id"], truth[task["id"]])
    before = {t["id"]: t["annotations"] for t in ls_api.tasks(project)}
    assert cli(ops, "connect", "--project", str(project), "--backend-url", ops["url"]).returncode == 0

    store = JobStore(connect(redis_server.url))
    holder = store.training_lock(str(project), "a-training-the-test-holds")
    assert holder.acquire()  # a training of the project "is running": the CLI's job must wait for it
    run = subprocess.Popen([sys.executable, "-m", "labelloop.cli", "train", "--project", str(project), "--wait",
                            "--timeout", "400"], env={**os.environ, **ops["env"]}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        first_line = run.stdout.readline()
        assert first_line.startswith("training job "), first_line + run.stderr.read()
        job_id = first_line.split()[2]
        wait_for(lambda: "waiting: another training" in (store.get(job_id) or {}).get("message", ""), 60,
                 "the CLI's job to wait for the project's training lock")
        # "Start training" in Label Studio (its ML connector sends the backend's basic auth) joins that job
        answer = httpx.post(f"{ops['url']}/webhook", auth=AUTH,
                            json={"action": "START_TRAINING", "project": {"id": project}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["job"] == job_id and answer.json()["coalesced"] is True
        record = httpx.get(f"{ops['url']}/jobs/{job_id}", auth=AUTH).json()
        assert (record["kind"], record["state"], record["trigger"], record["force"], record["events"]) == \
            ("train", "queued", "cli", True, 2)
        holder.release()
        out, err = run.communicate(timeout=420)
    finally:
        holder.release()
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    done = json.loads(out[out.index("{"):])
    assert done["job"] == job_id and done["version"] == f"p{project}-v1" and done["promoted"] is True
    assert "%|" in err  # the tqdm bar followed it
    trainings = [j for j in jobs_of(ops, project) if j["kind"] == "train"]
    assert [j["id"] for j in trainings] == [job_id], "one training for the CLI and the button"
    assert {t["id"]: t["annotations"] for t in ls_api.tasks(project)} == before  # never wrote an annotation

    listed = cli(ops, "versions", "--project", str(project), "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["version"], row["serving"], row["status"], row["metric"]) == (f"p{project}-v1", True, "serving", "top1")
    assert "promoted: first version" in row["reason"] and 0.0 <= row["value"] <= 1.0


def test_promote_and_rollback_do_what_the_api_does(ops, ls_api, tmp_path_factory, trained):
    project, tasks, _ = project_with_images(ls_api, tmp_path_factory, "ops versions", 8, seed=33)
    registry: Registry = ops["registry"]
    model = trained("classification")
    v1 = install_model(ops["home"] / "models", project, model)
    keep = {k: v for k, v in model.manifest.items() if k not in ("version", "project", "created_at",
                                                                 "weights_sha256", "parent")}
    v2 = registry.add_version(project, model.weights, {**keep, "parent": v1}).version
    registry.promote(project, v2, f"{v2} promoted: the test's gate")
    v3 = registry.add_version(project, model.weights, {**keep, "parent": v2}).version  # kept out

    table = cli(ops, "versions", "--project", str(project))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert [ln.split()[0 if not ln.startswith("*") else 1] for ln in lines] == [v3, v2, v1]  # newest first
    assert lines[1].startswith(f"* {v2}") and "serving: " in lines[1] and "the test's gate" in lines[1]
    assert "kept out" in lines[0] and f"  {v1}" in lines[2] and "promoted:" in lines[2]

    def served_and_pushed(version: str) -> None:
        wait_for(lambda: ls_api.project(project)["model_version"] == version, 240,
                 f"{version}'s predictions and model version in Label Studio")
        assert sorted(p["task"] for p in predictions_of(ls_api, project, version)) == sorted(t["id"] for t in tasks)

    back = cli(ops, "rollback", "--project", str(project), "--reason", "v2 mislabels stars")
    assert back.returncode == 0, back.stderr
    assert f"{v1} serves now" in back.stdout and "prediction job" in back.stdout
    assert registry.serving(project).version == v1
    served_and_pushed(v1)

    ahead = cli(ops, "promote", v3, "--project", str(project))
    assert ahead.returncode == 0, ahead.stderr
    assert registry.serving(project).version == v3
    served_and_pushed(v3)

    # the API's promotion is the same code: recorded as by hand (retention keeps it), predictions queued
    answer = httpx.post(f"{ops['url']}/versions/{v2}/promote", auth=AUTH).json()
    assert answer["serving"] == v2 and answer["prediction_job"], answer
    served_and_pushed(v2)
    hand = [(p["version"], p["by"]) for p in registry.manual_promotions(project)]
    assert hand == [(v1, "cli"), (v3, "cli"), (v2, "api")]
    assert "v2 mislabels stars" in registry.manual_promotions(project)[0]["reason"]
    # rolling back from a version promoted by hand goes to the version it was trained after
    assert cli(ops, "rollback", "--project", str(project)).returncode == 0
    assert registry.serving(project).version == v1
    first = cli(ops, "rollback", "--project", str(project))
    assert first.returncode == 3 and "first version" in one_line_error(first)


def test_errors_are_one_line_with_their_exit_code(ops, ls_api, tmp_path_factory, label_studio):
    from labelloop.dev.localstack import free_port

    missing = cli(ops, "connect", "--project", "987654", "--backend-url", ops["url"])
    assert missing.returncode == 3 and "has no project 987654" in one_line_error(missing)

    t0 = time.monotonic()
    down = cli(ops, "train", "--project", "1", LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2 and "unreachable" in one_line_error(down)
    assert time.monotonic() - t0 < 20  # one retry, not a job's 15 s of backoff

    project, tasks, _ = project_with_images(ls_api, tmp_path_factory, "ops errors", 4, seed=34)
    nothing = cli(ops, "versions", "--project", str(project))
    assert nothing.returncode == 3 and f"project {project} has no versions" in one_line_error(nothing)
    no_redis = cli(ops, "train", "--project", str(project), REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert no_redis.returncode == 2 and "Redis (the job queue)" in one_line_error(no_redis)
    wrong = cli(ops, "promote", f"p{project}-v7", "--project", str(project))
    assert wrong.returncode == 3 and f"has no version 'p{project}-v7'" in one_line_error(wrong)

    # a followed job: skipped (nothing labeled) exits 3, failed (a config labelloop cannot serve) exits 1
    skipped = cli(ops, "train", "--project", str(project), "--wait", "--timeout", "240")
    assert skipped.returncode == 3 and "need at least 2" in one_line_error(skipped)
    text = ls_api.create_project("ops text", '<View><Text name="t" value="$text"/>'
                                 '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>')["id"]
    failed = cli(ops, "train", "--project", str(text), "--wait", "--timeout", "240")
    assert failed.returncode == 1 and f"job {failed.stdout.split()[2]} failed: " in one_line_error(failed)
