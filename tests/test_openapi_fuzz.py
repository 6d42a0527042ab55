"""Schemathesis over the whole OpenAPI document, request bodies included: no input is a 5xx (issue 9).

The fuzz runs against a real ``labelloop serve`` (started as a user starts it) with basic auth and a
webhook secret on, a small task limit so the 413 answer is reachable, a private Redis that no worker
reads, no Label Studio and an empty registry: generated requests reach every handler and the job
queue, nothing they enqueue is ever run, and the engine is never asked to train or to predict.

Schemathesis runs through its CLI (``schemathesis run``), the interface its docs lead with: its
pytest plugin (``from_fixture``) does not run under pytest 9.2 (it reads ``Function._nodeid``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from urllib.parse import urlsplit

import httpx
import pytest

from labelloop.service.schemas import LABEL_CONFIG_EXAMPLE

USER, PASSWORD, SECRET = "ls", "fuzz-pass", "fuzz-hook-secret"
MAX_EXAMPLES = 50  # per operation in the fuzzing phase (examples and coverage phases come on top)
BODY_OPERATIONS = ("/setup", "/predict", "/webhook")
# Beyond "not a 5xx": the documented status codes, content types, error bodies and headers are the
# ones sent, declared auth is enforced, and undeclared methods get a 405 with Allow. Left out:
# positive_data_acceptance / negative_data_rejection, because the handlers check more than a schema
# can say (a label config that can be served, label_config required unless /setup was called) and
# ignore the fields they do not read (a webhook is a hint).
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,ignored_auth,unsupported_method,missing_required_header,"
          "allow_header_conformance")
CONFIG = f"""
[generation]
max-examples = {MAX_EXAMPLES}
deterministic = true
database = "none"

[auth.openapi.basicAuth]
username = "{USER}"
password = "{PASSWORD}"

[auth.openapi.webhookSecret]
api_key = "{SECRET}"
"""

# Loaded by the schemathesis process (SCHEMATHESIS_HOOKS). Label Studio sends events only for projects
# connected to the backend: most generated (valid) project ids are moved onto the connected ones, so
# events get past the "unknown project" answer into the event log and the job queue.
HOOKS = """
import schemathesis


@schemathesis.hook
def map_body(context, body):
    if context.operation is None or context.operation.path != "/webhook" or not isinstance(body, dict):
        return body
    project = body.get("project")
    given = project.get("id") if isinstance(project, dict) else project
    if type(given) is not int or given <= 0 or given % 4 == 0:  # invalid ids stay; a quarter stay unknown
        return body
    known = 1 + given % CONNECTED
    return {**body, "project": {**project, "id": known} if isinstance(project, dict) else known}
"""
CONNECTED = 20  # projects 1..20 are connected (/setup) before the fuzz


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, run_home):
    from labelloop.dev.localstack import start_backend, start_redis

    # A Redis of its own: the suite's Redis databases are read by workers in other tests.
    redis = start_redis(tmp_path_factory.mktemp("fuzz-redis"))
    home = tmp_path_factory.mktemp("fuzz-home")
    process = start_backend(home, env={
        "MODEL_DIR": str(home / "models"),
        "REDIS_URL": redis.url,
        "LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": "",
        "LABELLOOP_BASE_MODEL": "", "LABELLOOP_MODEL_CONFIG": "",  # no model, ever
        "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
        "LABELLOOP_WEBHOOK_SECRET": SECRET,
        "LABELLOOP_MAX_TASKS_PER_PREDICT": "5",
        # a bucket the fuzz cannot empty: with a small one most events stop at the 429 (which
        # test_service_hardening covers) and never reach the event log and the job queue
        "LABELLOOP_TRIGGER_BURST": "100000",
    })
    # Label Studio connects the backend to these projects (/setup), so webhooks for them go past the
    # "unknown project" answer into the job queue; generated ids are small integers more often than not.
    for project in range(1, CONNECTED + 1):
        answer = httpx.post(process.url + "/setup", auth=(USER, PASSWORD), timeout=30,
                            json={"project": f"{project}.1700000000", "schema": LABEL_CONFIG_EXAMPLE})
        assert answer.status_code == 200, answer.text
    yield process
    process.stop()
    redis.stop()


def _statuses(har: dict) -> dict[str, Counter]:
    seen: dict[str, Counter] = defaultdict(Counter)
    for entry in har["log"]["entries"]:
        path = urlsplit(entry["request"]["url"]).path
        seen[f"{entry['request']['method']} {path}"][entry["response"]["status"]] += 1
    return seen


def test_no_request_the_openapi_allows_or_breaks_is_a_5xx(fuzzed, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    (tmp_path / "labelloop_fuzz_hooks.py").write_text(HOOKS.replace("CONNECTED", str(CONNECTED)))
    har = tmp_path / "fuzz.har"
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"), "run",
         f"{fuzzed.url}/openapi.json", "--auth", f"{USER}:{PASSWORD}",  # the document itself needs auth
         "--phases", "examples,coverage,fuzzing", "--checks", CHECKS, "--workers", "1",
         "--request-timeout", "30", "--no-color", "--report", "har", "--report-har-path", str(har)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "labelloop_fuzz_hooks", "PYTHONPATH": str(tmp_path)})
    elapsed = time.monotonic() - t0
    output = run.stdout[-12000:] + run.stderr[-3000:]

    assert har.exists(), output
    seen = _statuses(json.loads(har.read_text()))
    server_errors = {op: dict(s) for op, s in seen.items() if any(code >= 500 for code in s)}
    assert not server_errors, f"5xx answers: {server_errors}\n{output}"
    assert run.returncode == 0, output
    total = re.search(r"Operations:\s+(\d+) selected / (\d+) total", output)
    assert total and total.group(1) == total.group(2) and int(total.group(2)) >= 11, output  # / and the contract
    assert f"Tested: {total.group(2)}" in output and "Schemathesis v4" in output, output  # every operation ran
    for path in BODY_OPERATIONS:
        statuses = seen[f"POST {path}"]
        assert sum(statuses.values()) >= MAX_EXAMPLES, (path, statuses)
        # past auth and parsing into the handlers: accepted requests and their own 422s
        assert any(200 <= code < 300 for code in statuses) and statuses[422], (path, dict(statuses))
        assert statuses[401], (path, dict(statuses))  # the auth path was exercised too

    # the server survived: still answering, never fell back to the last-resort 500 handler
    assert fuzzed.process.poll() is None
    assert httpx.get(fuzzed.url + "/health", timeout=10).json()["status"] == "UP"
    assert "unhandled error" not in fuzzed.log.read_text()
    print(f"schemathesis: {sum(sum(s.values()) for s in seen.values())} requests in {elapsed:.1f} s")
