"""The HTTP contract: hand-made Label Studio requests, bad input → 4xx, auth, webhooks, metrics.

Most checks run the real `labelloop serve` process; the input-validation matrix also runs through
FastAPI's in-process client (same app object, no socket) because it is a long list.
"""

from __future__ import annotations

import base64
import os
import time

import httpx
import pytest
from conftest import install_model
from fastapi.testclient import TestClient

from labelloop.dev.shapes import CLASSES, label_config

DETECT = label_config("detection", threshold=0.1)


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained, image_host):
    """`labelloop serve` with a detection model for project 7 and images on an allow-listed host."""
    from labelloop.dev.localstack import start_backend

    home = tmp_path_factory.mktemp("served")
    version = install_model(home / "models", 7, trained("detection"))
    process = start_backend(home, env={
        "LABELLOOP_ALLOWED_HOSTS": image_host.removeprefix("http://"),
        "YOLO_CONFIG_DIR": os.environ["YOLO_CONFIG_DIR"],
        "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "secret",
        "LABELLOOP_MAX_BODY_MB": "1",
        # its webhook test enqueues a job nobody should run: a Redis database of its own
        "REDIS_URL": os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/1",
    })
    process.info["version"] = version
    yield process
    process.stop()


AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}


def post(served, path, **kwargs):
    return httpx.post(served.url + path, headers=AUTH, timeout=120, **kwargs)


def test_hand_made_predict_gives_one_scored_prediction_per_task_in_order(served, image_host, shapes_eval):
    files = [im.file for im in shapes_eval.images[:5]]
    tasks = [{"id": 100 + i, "data": {"image": f"{image_host}/{name}"}} for i, name in enumerate(files)]
    tasks.insert(2, {"id": 999, "data": {"image": "http://not-allowed.example.com/x.png"}})  # refused host
    tasks.insert(4, {"id": 998, "data": {"image": f"{image_host}/missing.png"}})  # 404
    response = post(served, "/predict", json={"tasks": tasks, "project": "7.1700000000", "label_config": DETECT,
                                              "params": {"login": None, "password": None, "context": None}})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(tasks)
    for task, result in zip(tasks, results):
        assert result["model_version"] == served.info["version"]
        assert isinstance(result["score"], float) and 0.0 <= result["score"] <= 1.0
        if task["id"] in (998, 999):
            assert result["result"] == [] and result["error"]
        else:
            assert "error" not in result
            for region in result["result"]:
                assert region["value"]["rectanglelabels"][0] in CLASSES
    assert "not allowed" in results[2]["error"] and "404" in results[4]["error"]
    # where the time went, for anyone looking at a slow request: Server-Timing with the phases that ran
    timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    assert {"model", "fetch", "infer", "serialize"} <= set(timing) and all(float(v) >= 0 for v in timing.values())
    # the same request again is served from the image cache and the model cache: identical answer
    again = post(served, "/predict", json={"tasks": tasks, "project": "7.1700000000", "label_config": DETECT})
    assert again.json()["results"] == results


def test_setup_health_and_versions_report_the_model(served):
    health = httpx.get(served.url + "/health").json()  # no auth needed
    assert health["status"] == "UP" and health["models"] == {"7": served.info["version"]}
    setup = post(served, "/setup", json={"project": "7.1700000000", "schema": DETECT, "hostname": "http://x",
                                         "access_token": "legacy", "extra_params": None}).json()
    assert setup["model_version"] == served.info["version"] and setup["model_ready"] is True
    # /setup answers at once (Label Studio waits 3 s) and loads and warms the model behind it
    deadline = time.monotonic() + 60
    while served.info["version"] not in httpx.get(served.url + "/health").json()["loaded"]:
        assert time.monotonic() < deadline, "the model /setup named was not loaded in the background"
        time.sleep(0.1)
    versions = httpx.get(served.url + "/versions", headers=AUTH).json()
    assert versions["versions"] == [served.info["version"]]
    assert versions["serving"] == {"7": served.info["version"]}


def test_no_model_yet_means_no_predictions_not_empty_ones(served, image_host, shapes_eval):
    tasks = [{"id": 1, "data": {"image": f"{image_host}/{shapes_eval.images[0].file}"}}]
    body = post(served, "/predict", json={"tasks": tasks, "project": "8.1700000000", "label_config": DETECT}).json()
    assert body["results"] == [] and "no model yet for project 8" in body["message"]
    setup = post(served, "/setup", json={"project": "8.1700000000", "schema": DETECT}).json()
    assert setup["model_ready"] is False and "no model yet" in setup["message"]


def test_basic_auth_on_everything_but_health_and_webhook(served):
    assert httpx.post(served.url + "/predict", json={"tasks": []}).status_code == 401
    assert httpx.get(served.url + "/metrics").status_code == 401
    assert httpx.get(served.url + "/versions", auth=("ls", "wrong")).status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200
    hook = httpx.post(served.url + "/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7},
                                                     "annotation": {"id": 3}, "task": {"id": 4}})
    assert hook.status_code == 200 and hook.json()["status"] == "accepted"
    events = httpx.get(served.url + "/events?project=7", headers=AUTH).json()["events"]
    assert events[-1]["action"] == "ANNOTATION_CREATED" and events[-1]["task"] == 4


def test_oversized_body_is_413_and_server_keeps_serving(served):
    big = {"tasks": [{"data": {"image": "x" * 2_000_000}}], "label_config": DETECT}
    assert post(served, "/predict", json=big).status_code == 413
    chunked = post(served, "/predict", content=iter([b'{"tasks": ["' + b"x" * 600_000, b"y" * 600_000 + b'"]}']))
    assert chunked.status_code == 413
    assert httpx.get(served.url + "/health").status_code == 200


def test_metrics_count_requests_predictions_and_errors(served, image_host, shapes_eval):
    tasks = [{"id": 1, "data": {"image": f"{image_host}/{shapes_eval.images[1].file}"}}]
    post(served, "/predict", json={"tasks": tasks, "project": "7", "label_config": DETECT})
    post(served, "/predict", content=b"{nope")
    text = httpx.get(served.url + "/metrics", headers=AUTH).text
    assert 'labelloop_http_requests_total{endpoint="/predict",method="POST",status="200"}' in text
    assert f'labelloop_predictions_total{{model_version="{served.info["version"]}"}}' in text
    assert 'labelloop_http_errors_total{endpoint="/predict",status="400"}' in text
    assert "labelloop_http_request_duration_seconds_bucket" in text
    for phase in ("fetch", "infer", "serialize"):  # the same split as Server-Timing
        assert f'labelloop_predict_phase_seconds_count{{phase="{phase}"}}' in text


# -- the validation matrix, in process ----------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory, run_home):
    from labelloop.config import settings
    from labelloop.service.app import build_app_with_limits

    os.environ["MODEL_DIR"] = str(tmp_path_factory.mktemp("empty-models"))
    try:
        app = build_app_with_limits(settings())
    finally:
        os.environ.pop("MODEL_DIR")
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("path,body,status,message", [
    ("/predict", b"", 400, "empty"),
    ("/predict", b"{not json", 400, "not valid JSON"),
    ("/predict", b"[1, 2]", 400, "JSON object"),
    ("/predict", b'{"tasks": 5, "label_config": "<View/>"}', 422, "'tasks' must be a list"),
    ("/predict", b'{"tasks": [3]}', 422, "tasks[0] must be an object"),
    ("/predict", b'{"tasks": [{"id": 1}]}', 422, "tasks[0].data"),
    ("/predict", b'{"tasks": [{"data": {}}]}', 422, "label_config"),
    ("/predict", b'{"tasks": [{"data": {}}], "label_config": "<View><Text name=\\"t\\" value=\\"$t\\"/></View>"}',
     422, "no control the model can serve"),
    ("/predict", b'{"tasks": [{"data": {}}], "label_config": "<View"}', 422, "not valid XML"),
    ("/predict", b'{"tasks": [], "project": {"id": 1}, "label_config": "x"}', 422, "'project'"),
    ("/predict", b'{"tasks": [{"data": {}}], "label_config": 7}', 422, "label_config"),
    ("/setup", b'{"project": "1.2"}', 422, "'schema'"),
    ("/setup", b'{"schema": "<View><Image name=\\"i\\" value=\\"$i\\"/></View>"}', 422, "no control"),
    ("/webhook", b'{"project": {"id": 1}}', 422, "'action'"),
    ("/webhook", b'{"action": "DROP_TABLES", "project": {"id": 1}}', 422, "unknown webhook action"),
    ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": "1"}}', 422, "project.id"),
    ("/webhook", b'{"action": "ANNOTATION_CREATED"}', 422, "project.id"),
])
def test_bad_requests_get_4xx_with_a_message(client, path, body, status, message):
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_unknown_paths_and_methods_are_json_4xx(client):
    assert client.get("/nope").status_code == 404 and "no such endpoint" in client.get("/nope").json()["error"]
    assert client.get("/predict").status_code == 405
    assert client.get("/health").json()["status"] == "UP"


# -- the OpenAPI document is the contract (issue 9, item 6) ---------------------------------------------

BODIES = {  # path -> (request model, required fields, documented {"error": ...} answers)
    "/setup": ("SetupRequest", {"schema"}, {400, 401, 413, 422}),
    "/predict": ("PredictRequest", {"tasks"}, {400, 401, 413, 422}),
    "/webhook": ("WebhookRequest", {"action", "project"}, {400, 401, 403, 413, 422, 429, 503}),
}


def test_openapi_declares_request_bodies_and_error_answers(client):
    from labelloop.service.schemas import WEBHOOK_ACTIONS, PredictRequest, SetupRequest, WebhookRequest

    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, (name, required, codes) in BODIES.items():
        operation = doc["paths"][path]["post"]
        assert operation["requestBody"]["required"] is True
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{name}"}
        assert set(schemas[name]["required"]) == required
        assert schemas[name]["additionalProperties"] is True  # Label Studio adds fields across versions
        documented = {int(code) for code in operation["responses"] if code.startswith("4") or code.startswith("5")}
        assert documented == codes, path
        for code in codes:
            body = operation["responses"][str(code)]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorBody"}, (path, code)
    assert schemas["ErrorBody"]["required"] == ["error"]
    assert set(schemas["WebhookRequest"]["properties"]["action"]["enum"]) == WEBHOOK_ACTIONS
    assert "Retry-After" in doc["paths"]["/webhook"]["post"]["responses"]["429"]["headers"]
    assert "HTTPValidationError" not in str(doc["paths"])  # every 4xx is {"error": ...}, FastAPI's own too

    # the models take what Label Studio 1.23.2 sends (docs: label-studio-protocol.md), extra fields included
    SetupRequest.model_validate({"project": "1.1795358080", "schema": DETECT, "hostname": "http://localhost:8080",
                                 "access_token": "x" * 40, "extra_params": None, "added_in_1_24": 1})
    PredictRequest.model_validate({"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}, "meta": {},
                                              "annotations": [], "predictions": [], "inner_id": 1}],
                                   "project": "1.1795358080", "label_config": DETECT,
                                   "params": {"login": None, "password": None, "context": None}})
    WebhookRequest.model_validate({"action": "ANNOTATION_CREATED", "annotation": {"id": 2, "result": []},
                                   "task": {"id": 4, "data": {}}, "project": {"id": 1, "title": "p"}})
    WebhookRequest.model_validate({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 2}], "project": {"id": 1}})


def test_typed_query_parameters_get_the_same_error_shape(client):
    answer = client.get("/jobs", params={"limit": "many"})
    assert answer.status_code == 422 and "limit" in answer.json()["error"], answer.text
    assert client.request("TRACE", "/setup").headers["allow"] == "POST"  # a 405 says what is allowed


def test_openapi_declares_the_auth_this_deployment_enforces(tmp_path, run_home):
    import dataclasses

    from labelloop.config import settings
    from labelloop.service.app import create_app

    env = dataclasses.replace(settings(), model_dir=tmp_path, basic_auth_user="ls", basic_auth_pass="secret",
                              webhook_secret="s3cret")
    secured = TestClient(create_app(env), raise_server_exceptions=False)
    assert secured.get("/openapi.json").status_code == 401
    doc = secured.get("/openapi.json", headers=AUTH).json()
    assert doc["components"]["securitySchemes"] == {
        "basicAuth": {"type": "http", "scheme": "basic"},
        "webhookSecret": {"type": "apiKey", "in": "header", "name": "X-Labelloop-Webhook-Secret"}}
    assert "security" not in doc["paths"]["/health"]["get"]
    assert doc["paths"]["/webhook"]["post"]["security"] == [{"webhookSecret": []}, {"basicAuth": []}]
    assert doc["paths"]["/predict"]["post"]["security"] == [{"basicAuth": []}]
    # without a secret the webhook is open (and the document says so); without auth nothing is declared
    open_hook = dataclasses.replace(env, webhook_secret="")
    doc = TestClient(create_app(open_hook)).get("/openapi.json", headers=AUTH).json()
    assert doc["paths"]["/webhook"]["post"]["security"] == [{"basicAuth": []}, {}]
    no_auth = dataclasses.replace(env, basic_auth_user="", basic_auth_pass="", webhook_secret="")
    assert "securitySchemes" not in TestClient(create_app(no_auth)).get("/openapi.json").json()["components"]
