"""`labelloop flower`: Celery Flower over labelloop's broker, secure by default like `labelloop serve`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from labelloop.dev.localstack import free_port, start_flower, start_worker


@pytest.mark.unit
def test_the_password_goes_through_flowers_env_never_argv(monkeypatch):
    from labelloop.cli import flower_command
    from labelloop.config import settings

    monkeypatch.setenv("BASIC_AUTH_USER", "ops")
    monkeypatch.setenv("BASIC_AUTH_PASS", "pa:ss word")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "someone:else")  # inherited: never passed on
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    argv, env = flower_command("0.0.0.0", 5555, settings())
    assert not any("pa:ss word" in a for a in argv)
    assert "--address=0.0.0.0" in argv and "--port=5555" in argv
    assert env["FLOWER_BASIC_AUTH"] == "ops:pa:ss word"
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    monkeypatch.delenv("BASIC_AUTH_USER")
    monkeypatch.delenv("BASIC_AUTH_PASS")
    _, env = flower_command("127.0.0.1", 5555, settings())
    assert "FLOWER_BASIC_AUTH" not in env
    assert env["FLOWER_UNAUTHENTICATED_API"] == "true"  # loopback without auth, like `labelloop serve` there


def test_on_loopback_without_auth_the_api_answers(tmp_path, run_home, monkeypatch):
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)
    flower = start_flower(tmp_path / "flower")
    try:
        assert httpx.get(f"{flower.url}/api/workers", timeout=30).status_code == 200
    finally:
        flower.stop()


@pytest.mark.unit
def test_an_open_address_without_auth_is_refused():
    env = {k: v for k, v in os.environ.items() if k not in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABELLOOP_INSECURE")}
    run = subprocess.run([sys.executable, "-m", "labelloop.cli", "flower", "--host", "0.0.0.0", "--port",
                          str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "BASIC_AUTH_USER" in run.stderr and "Traceback" not in run.stderr


def test_flower_sees_a_real_worker_and_wants_the_backends_auth(tmp_path, run_home):
    env = {"BASIC_AUTH_USER": "ops", "BASIC_AUTH_PASS": "s3cret"}
    worker = start_worker(tmp_path / "worker", queues="predict", name="flowertest")
    flower = start_flower(tmp_path / "flower", env=env)
    try:
        assert httpx.get(f"{flower.url}/api/workers", timeout=10).status_code == 401
        assert httpx.get(f"{flower.url}/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
        workers = httpx.get(f"{flower.url}/api/workers", params={"refresh": 1}, auth=("ops", "s3cret"),
                            timeout=30).json()
        assert "flowertest" in {name.split("@")[0] for name in workers}, workers
        queues = {q["name"] for info in workers.values() for q in info.get("active_queues", [])}
        assert "labelloop.predict" in queues, queues
    finally:
        flower.stop()
        worker.stop()
