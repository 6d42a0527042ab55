"""`labelloop stack env`: the exports that point a shell at the running local stack."""

import os
import subprocess

import pytest

from labelloop.dev import stack
from labelloop.errors import LabelloopError

pytestmark = pytest.mark.unit


def _state(pid: int) -> dict:
    alive = {"pid": pid}
    return {
        "services": {
            "redis": {**alive, "url": "redis://127.0.0.1:6390/0"},
            "mongod": {**alive, "url": "mongodb://127.0.0.1:27027"},
            "label-studio": {**alive, "url": "http://127.0.0.1:8080"},
        },
        "label_studio": {"username": "admin@example.com", "password": "pw", "token": "tok'en $(touch /tmp/x)"},
    }


def test_exports_evaluate_to_the_stack_env_in_a_shell():
    state = _state(os.getpid())
    script = stack.shell_exports(state) + '\nprintf "%s\\n" "$REDIS_URL" "$FIFTYONE_DATABASE_URI" ' \
                                            '"$LABEL_STUDIO_URL" "$LABEL_STUDIO_API_KEY"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    # a token with quotes and $(...) comes back verbatim: quoted, never executed
    assert out == ["redis://127.0.0.1:6390/0", "mongodb://127.0.0.1:27027", "http://127.0.0.1:8080",
                   "tok'en $(touch /tmp/x)"]
    assert set(stack.service_env(state)) <= {line.split("=", 1)[0].removeprefix("export ")
                                             for line in stack.shell_exports(state).splitlines()}


def test_a_stopped_stack_is_an_error_that_says_how_to_start_it():
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(LabelloopError, match="labelloop stack up") as err:
        stack.shell_exports(_state(dead.pid))
    assert "redis" in str(err.value)
    with pytest.raises(LabelloopError, match="not running"):
        stack.shell_exports({"services": {}})
