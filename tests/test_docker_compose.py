"""The ops stack (docker/), checked without a Docker engine or a network.

The compose file is parsed with PyYAML (anchors and merge keys resolved as Compose does) and
interpolated the way Compose does (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``).
What is checked:

* the structure Compose needs: against the Compose specification's JSON schema when
  ``check-jsonschema`` (which ships that schema) is installed, and with ``docker compose config``
  when a Compose binary is on PATH (else those two are skipped, the rest still runs);
* every command of our services (and every CMD of the Dockerfile) is a real ``labelloop``
  subcommand whose options parse with ``labelloop.cli.build_parser()``, or the FiftyOne CLI's
  ``app launch`` parsed by FiftyOne's own parser (in a subprocess: importing fiftyone here would
  freeze its config for the rest of the test session);
* every environment variable of our services (and the Dockerfile's ENV) is in README.md's
  configuration table or a known third-party one; Label Studio's are names Label Studio 1.23.2
  reads (checked against its source when its venv is installed);
* every ``${VAR}`` is in docker/.env.example with a comment, the same default everywhere, and no
  unused entry; every secret is required (``${VAR:?...}``) and empty in .env.example, so an
  untouched copy makes Compose refuse to start; docker/README's one-liner fills them; the
  interpolated environment (secrets filled) gives valid labelloop settings;
* named volumes declared == used; the shared volumes sit at the same paths in backend, both
  workers and the App, and those are MODEL_DIR / LABELLOOP_CACHE_DIR / MODEL_ROOT;
* depends_on targets exist (and have healthchecks where they must be healthy), host ports are
  unique, bound to 127.0.0.1 unless configured, and match the ports the commands listen on; the
  FiftyOne App only runs with its profile; every service has a healthcheck;
* the services are wired to each other (Label Studio URL, token, Redis, MongoDB, PostgreSQL);
* the Dockerfile(s) that ``build:`` names exist, have the targets and ARGs used, COPY only paths
  that exist and that their .dockerignore lets through;
* the GPU override only adds to existing services, builds the CUDA variant, reserves a GPU;
* docker/healthcheck.py answers as the healthchecks expect.

None of the session fixtures of conftest.py is used.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
GPU_OVERRIDE = DOCKER / "docker-compose.gpu.yml"
ENV_EXAMPLE = DOCKER / ".env.example"

OUR_SERVICES = ("backend", "worker-train", "worker-predict", "fiftyone", "delegated")
WORKERS = ("worker-train", "worker-predict")
EXPECTED_SERVICES = {"label-studio", "postgres", "redis", "mongodb", "flower", *OUR_SERVICES}
# service -> its profiles (analysis is opt-in: the App, its database, the service running what it schedules)
OPTIONAL = {"fiftyone": ["fiftyone"], "mongodb": ["fiftyone"], "delegated": ["fiftyone"]}
# volume -> the labelloop setting that must point at its mount path
SHARED_VOLUMES = {"models": "MODEL_DIR", "cache": "LABELLOOP_CACHE_DIR", "weights": "MODEL_ROOT"}
EXPECTED_PORTS = {"label-studio": 8080, "backend": 9090, "fiftyone": 5151, "flower": 5555}

THIRD_PARTY_PREFIXES = ("FIFTYONE_", "YOLO_")  # read by FiftyOne and ultralytics themselves
IMAGE_BUILD_ENV = {"PATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR",
                   "PIP_DISABLE_PIP_VERSION_CHECK"}
# Label Studio 1.23.2 (core/settings/base.py, server.py; get_env() also tries the LABEL_STUDIO_ prefix)
LABEL_STUDIO_ENV = {"DJANGO_DB", "POSTGRE_NAME", "POSTGRE_USER", "POSTGRE_PASSWORD", "POSTGRE_HOST", "POSTGRE_PORT",
                    "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN",
                    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK",
                    "ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED", "COLLECT_ANALYTICS", "LATEST_VERSION_CHECK",
                    "SENTRY_DSN", "FRONTEND_SENTRY_DSN",
                    "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"}  # data_import/api.py
# variables the compose CLI itself reads from .env
COMPOSE_CLI_VARS = {"COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES"}

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


# --------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; Compose refuses the file. So do we."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: merged (and overridable) by construct_mapping
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _load(path: Path) -> dict:
    with path.open() as fh:
        data = yaml.load(fh, Loader=_StrictLoader)
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


@functools.cache
def compose() -> dict:
    return _load(COMPOSE)


@functools.cache
def gpu_override() -> dict:
    return _load(GPU_OVERRIDE)


def services() -> dict:
    return compose()["services"]


def _strings(node):
    """Every string value in a YAML tree (keys are not interpolated by Compose)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def env_example() -> dict[str, str]:
    """NAME=value lines of .env.example (commented-out assignments included, as documented options)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(rf"^\s*#?\s*({_NAME})=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2).strip()
    return values


def env_example_active() -> dict[str, str]:
    return {k: v for k, v in (
        re.match(rf"^({_NAME})=(.*)$", line).groups() for line in ENV_EXAMPLE.read_text().splitlines()
        if re.match(rf"^{_NAME}=", line))}


# --------------------------------------------------------------------------- interpolation


class MissingVariable(Exception):
    pass


def _closing_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unclosed ${{ in {text!r}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, ${VAR:+r}, $$."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 1)
            out.append(_expression(text[i + 2:end], env))
            i = end + 1
        elif (m := re.match(r"\$(" + _NAME + ")", text[i:])):
            out.append(env.get(m.group(1), ""))
            i += m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _expression(body: str, env: dict[str, str]) -> str:
    m = re.fullmatch(r"(" + _NAME + r")(?:(:?[-?+])(.*))?", body, re.S)
    if not m:
        raise ValueError(f"bad interpolation ${{{body}}}")
    name, op, arg = m.groups()
    value = env.get(name)
    if op is None:
        return value or ""
    if op in (":-", "-"):
        unset = not value if op == ":-" else value is None
        return interpolate(arg, env) if unset else value
    if op in (":?", "?"):
        unset = not value if op == ":?" else value is None
        if unset:
            raise MissingVariable(f"{name}: {arg}")
        return value
    present = bool(value) if op == ":+" else value is not None
    return interpolate(arg, env) if present else ""


def resolve(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    return node


def variables_used(node) -> set[str]:
    names = set()
    for text in _strings(node):
        text = text.replace("$$", "")
        names.update(re.findall(r"\$\{(" + _NAME + ")", text))
        names.update(re.findall(r"\$(" + _NAME + ")", text))
    return names


def defaults_used(node) -> dict[str, set[str]]:
    """NAME -> the literal defaults of ${NAME:-default} / ${NAME-default} (nested ones left out)."""
    found: dict[str, set[str]] = {}
    for text in _strings(node):
        for name, default in re.findall(r"\$\{(" + _NAME + r"):?-([^}$]*)\}", text.replace("$$", "")):
            found.setdefault(name, set()).add(default)
    return found


def required_vars(node) -> set[str]:
    return {name for text in _strings(node) for name in re.findall(r"\$\{(" + _NAME + r"):?\?", text)}


SECRETS = {"POSTGRES_PASSWORD", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN", "BASIC_AUTH_PASS",
           "LABELLOOP_WEBHOOK_SECRET"}


def filled_env() -> dict[str, str]:
    """docker/.env as an operator makes it: .env.example with every secret set."""
    return {**env_example_active(), **{name: f"secret-of-{name.lower()}" for name in SECRETS}}


def resolved_stack(extra_env: dict[str, str] | None = None) -> dict:
    """The compose file as Compose sees it with docker/.env made from .env.example, secrets filled."""
    return resolve(compose(), {**filled_env(), **(extra_env or {})})


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# --------------------------------------------------------------------------- Dockerfile parsing


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    instructions, buffer = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            keyword, _, rest = buffer.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        buffer = ""
    return instructions


def _json_or_shell(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


@functools.cache
def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Stage name -> {parent, args, env, workdir, copies [(src, dest)], cmd, healthcheck}, inherited."""
    stages: dict[str, dict] = {}
    global_args: set[str] = set()
    current = None
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = words[0]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else f"stage{len(stages)}"
            parent = stages.get(image)
            current = {
                "name": name, "parent": image if parent else None, "base_image": image,
                "args": set(parent["args"]) if parent else set(),
                "env": dict(parent["env"]) if parent else {},
                "workdir": parent["workdir"] if parent else "/",
                "copies": list(parent["copies"]) if parent else [],
                "cmd": parent["cmd"] if parent else None,
                "healthcheck": parent["healthcheck"] if parent else None,
                "global_args": set(global_args),
            }
            stages[name] = current
        elif current is None:
            if keyword == "ARG":
                global_args.add(args.split("=", 1)[0].strip())
        elif keyword == "ARG":
            current["args"].add(args.split("=", 1)[0].strip())
        elif keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                current["env"][key] = value
        elif keyword == "WORKDIR":
            current["workdir"] = str(Path(current["workdir"]) / args.strip())
        elif keyword in ("COPY", "ADD"):
            words = [w for w in _json_or_shell(args) if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in args.split()), "COPY --from is not checked here"
            *sources, dest = words
            dest_abs = dest if dest.startswith("/") else str(Path(current["workdir"]) / dest)
            for src in sources:
                current["copies"].append((src, dest_abs))
        elif keyword == "CMD":
            current["cmd"] = _json_or_shell(args)
        elif keyword == "HEALTHCHECK":
            current["healthcheck"] = args
    return stages


def copy_destination(stages: dict, stage: str, source: str) -> str:
    """Where ``source`` (a repo path) lands in the image of ``stage``."""
    for src, dest in stages[stage]["copies"]:
        if src.rstrip("/") == source.rstrip("/"):
            if src.endswith("/") or dest.endswith("/"):
                return dest.rstrip("/") if src.endswith("/") else str(Path(dest) / Path(src).name)
            return dest
    raise AssertionError(f"{source} is not COPY'd into stage {stage}")


def our_builds(data: dict | None = None) -> dict[str, dict]:
    data = data if data is not None else resolved_stack()
    return {name: svc["build"] for name, svc in data["services"].items() if "build" in svc}


def build_dockerfile(build: dict) -> Path:
    context = (COMPOSE.parent / build.get("context", ".")).resolve()
    return (context / build.get("dockerfile", "Dockerfile")).resolve()


# --------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(ignore_file: Path, relpath: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip().strip("/")
        regex = _pattern_regex(pattern)
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def repo_files(source: str) -> list[str]:
    path = ROOT / source
    if path.is_file():
        return [source.rstrip("/")]
    return sorted(str(p.relative_to(ROOT)) for p in path.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


# --------------------------------------------------------------------------- CLIs


def _no_abbreviations(parser) -> None:
    """argparse takes `--queue` for `--queues`; a compose file should spell options out."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def labelloop_parse(argv: list[str]):
    from labelloop.cli import build_parser

    parser = build_parser()
    _no_abbreviations(parser)
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports and exits on an unknown command or option
        raise AssertionError(f"`labelloop {' '.join(argv)}` does not parse (exit {exc.code})") from None


_FIFTYONE_PARSE = """
import json, sys
import fiftyone.constants as foc
from fiftyone.core.cli import FiftyOneCommand, _register_main_command
args = _register_main_command(FiftyOneCommand, version=foc.VERSION_LONG).parse_args(sys.argv[1:])
print(json.dumps({k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}))
"""


@functools.cache
def fiftyone_parse(argv: tuple[str, ...]) -> dict:
    """FiftyOne's own CLI parser on argv, in a subprocess (nothing is executed, no DB is touched)."""
    env = {**os.environ, "FIFTYONE_DATABASE_URI": "mongodb://127.0.0.1:9", "FIFTYONE_DO_NOT_TRACK": "true"}
    done = subprocess.run([sys.executable, "-c", _FIFTYONE_PARSE, *argv], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, f"`fiftyone {' '.join(argv)}` does not parse:\n{done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_command(argv: list[str]) -> dict:
    """Parse a service command with the real CLI; returns the parsed options."""
    assert argv, "empty command"
    if argv[0] == "labelloop":
        return vars(labelloop_parse(argv[1:]))
    if argv[0] == "fiftyone":
        assert argv[1:3] == ["app", "launch"], f"unexpected fiftyone command {argv}"
        return fiftyone_parse(tuple(argv[1:]))
    raise AssertionError(f"command {argv} is neither a labelloop nor a fiftyone command")


def healthcheck_script_args(test: list[str]) -> list[str] | None:
    """The arguments given to docker/healthcheck.py by a healthcheck test, or None."""
    for i, word in enumerate(test):
        if word.endswith("/healthcheck.py"):
            return test[i + 1:]
    return None


# =========================================================================== the tests


def test_compose_has_the_stack():
    assert set(services()) == EXPECTED_SERVICES
    assert services()["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    assert services()["mongodb"]["image"] == "mongo:6"
    assert services()["redis"]["image"] == "redis:7"
    postgres = services()["postgres"]["image"]
    assert postgres.startswith("postgres:") and int(postgres.split(":")[1].split(".")[0]) >= 14, \
        "Label Studio 1.23.2 (Django 5.2) needs PostgreSQL >= 14"
    for name in (*OUR_SERVICES, "flower"):
        assert "build" in services()[name], f"{name} must be built from the project"


def _compose_schema():
    check_jsonschema = pytest.importorskip(
        "check_jsonschema", reason="check-jsonschema (ships the Compose spec schema) is not installed")
    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    if not path.is_file():
        pytest.skip(f"no compose-spec.json in {path.parent}")
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec_schema(path):
    import jsonschema

    schema = _compose_schema()
    data = resolve(_load(path), filled_env())  # Compose validates after interpolation
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20])


def _compose_binary() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        try:
            ok = subprocess.run([*argv, "version"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return argv
    return None


def _write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU_OVERRIDE]], ids=["base", "base+gpu"])
def test_docker_compose_config_accepts_the_stack(files, tmp_path):
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no `docker compose` / `docker-compose` binary (it needs no engine for `config`)")
    env_file = _write_env(tmp_path / ".env", filled_env())
    argv = [*binary, "--project-directory", str(DOCKER), "--env-file", str(env_file)]
    for f in files:
        argv += ["-f", str(f)]
    done = subprocess.run([*argv, "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_docker_compose_refuses_an_untouched_env_example(tmp_path):
    """`cp .env.example .env` and nothing else: Compose itself refuses, naming a missing secret."""
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no `docker compose` / `docker-compose` binary (it needs no engine for `config`)")
    project = tmp_path / "docker"
    project.mkdir()
    shutil.copy(ENV_EXAMPLE, project / ".env")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    done = subprocess.run([*binary, "--project-directory", str(project), "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0, "docker compose accepted the stack with .env.example's empty secrets"
    assert re.search(r"set (\w+) in docker/\.env", done.stderr), done.stderr


def test_stack_needs_its_secrets():
    """No default admin password or token: Compose refuses to start without them."""
    assert required_vars(compose()) == SECRETS
    with pytest.raises(MissingVariable):
        resolve(compose(), {})


def test_untouched_env_example_makes_compose_refuse():
    """.env.example copied to .env as it is: every secret is missing, each with a message naming it."""
    env = env_example_active()
    for name in SECRETS:
        assert name in env and env[name] == "", f".env.example must leave {name} empty, not {env.get(name)!r}"
    missing = set()
    for name in SECRETS:  # Compose reports one at a time: fill the others and look at each
        with pytest.raises(MissingVariable) as raised:
            resolve(compose(), {**filled_env(), name: env[name]})
        assert str(raised.value).startswith(f"{name}: set {name} in docker/.env"), str(raised.value)
        missing.add(name)
    assert missing == SECRETS
    resolve(compose(), filled_env())  # and with them set it resolves


def test_readme_one_liner_fills_every_secret(tmp_path):
    """docker/README.md's command, run on a fresh copy of .env.example, makes a .env Compose accepts."""
    readme = (DOCKER / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("python3 -c") and "docker/.env" in ln)
    argv = shlex.split(line)
    (tmp_path / "docker").mkdir()
    shutil.copy(ENV_EXAMPLE, tmp_path / "docker" / ".env")
    done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    values = {}
    for raw in (tmp_path / "docker" / ".env").read_text().splitlines():
        if m := re.match(rf"^({_NAME})=(.*)$", raw):
            values[m.group(1)] = m.group(2)
    for name in SECRETS:
        assert re.fullmatch(r"[0-9a-f]{40}", values[name]), f"{name}={values[name]!r}"
    assert len({values[name] for name in SECRETS}) == len(SECRETS), "each secret must be its own"
    assert {k: v for k, v in values.items() if k not in SECRETS} == \
        {k: v for k, v in env_example_active().items() if k not in SECRETS}, "it must change nothing else"
    resolve(compose(), values)


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_service_command_is_a_real_cli_command(name):
    svc = resolved_stack()["services"][name]
    command = svc["command"]
    assert isinstance(command, list), f"{name}: use the exec (list) form so no shell sits in between"
    parsed = check_command(command)
    if name == "backend":
        assert command[:2] == ["labelloop", "serve"]
        assert parsed["host"] == "0.0.0.0" and parsed["port"] == EXPECTED_PORTS["backend"]
    elif name in WORKERS:
        from labelloop.cli import QUEUES

        assert command[:2] == ["labelloop", "worker"]
        queues = [q.strip() for q in parsed["queues"].split(",") if q.strip()]
        assert queues and set(queues) <= set(QUEUES), f"{name}: queues {queues} not in {sorted(QUEUES)}"
        assert queues == [name.split("-", 1)[1]], f"{name} must run the {name.split('-', 1)[1]} queue only"
    elif name == "delegated":  # FiftyOne's delegated-operation service with labelloop's FiftyOne settings
        assert command == ["labelloop", "delegated"]
        assert not parsed["check"], "--check is the health check, not the service"
    else:  # `labelloop app`: FiftyOne's App server with /media limited to the media folders (fo_app.py)
        assert command[:2] == ["labelloop", "app"]
        assert parsed["address"] == "0.0.0.0" and parsed["port"] == EXPECTED_PORTS["fiftyone"]


def test_flower_is_labelloop_flower_with_the_backends_auth():
    svc = resolved_stack()["services"]["flower"]
    command = svc["command"]
    assert command[:2] == ["labelloop", "flower"]
    parsed = check_command(command)
    assert parsed["host"] == "0.0.0.0" and parsed["port"] == EXPECTED_PORTS["flower"]
    env = environment(svc)
    # on 0.0.0.0 `labelloop flower` refuses to start without the pair; the stack always sets it
    assert env["BASIC_AUTH_USER"] and env["BASIC_AUTH_PASS"] == "secret-of-basic_auth_pass"
    assert urlsplit_host(env["REDIS_URL"]) == "redis"
    assert healthcheck_script_args(svc["healthcheck"]["test"]) == ["http", "http://127.0.0.1:5555/healthcheck"]
    assert not (svc.get("volumes") or []), "Flower reads the broker only: no model or image volume"


def urlsplit_host(url: str) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname


def test_dockerfile_default_commands_are_real_cli_commands():
    for name, build in our_builds().items():
        stages = dockerfile_stages(build_dockerfile(build))
        stage = build.get("target") or list(stages)[-1]
        cmd = stages[stage]["cmd"]
        assert cmd, f"stage {stage} has no CMD"
        check_command(cmd)
        assert stages[stage]["healthcheck"], f"stage {stage} has no HEALTHCHECK"
        if name == "backend":
            assert cmd == services()["backend"]["command"], "the image's CMD is the backend's command"
        if name == "fiftyone":
            assert cmd == services()["fiftyone"]["command"], "the App image's CMD is the fiftyone command"


def readme_configuration_variables() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    assert len(names) > 20, "README's configuration table was not found"
    return names


def _documented(name: str) -> bool:
    return name in readme_configuration_variables() or name.startswith(THIRD_PARTY_PREFIXES)


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_our_services_environment_is_documented(name):
    undocumented = sorted(k for k in environment(services()[name]) if not _documented(k))
    assert not undocumented, f"{name}: not in README's configuration table: {undocumented}"


def test_dockerfile_environment_is_documented():
    for build in our_builds().values():
        for stage in dockerfile_stages(build_dockerfile(build)).values():
            undocumented = sorted(k for k in stage["env"] if not _documented(k) and k not in IMAGE_BUILD_ENV)
            assert not undocumented, f"stage {stage['name']}: ENV not in README's configuration table: {undocumented}"


def test_label_studio_environment_is_known():
    unknown = sorted(set(environment(services()["label-studio"])) - LABEL_STUDIO_ENV)
    assert not unknown, f"label-studio: variables Label Studio 1.23.2 is not known to read: {unknown}"


def test_label_studio_environment_names_exist_in_its_source():
    from labelloop.dev.localstack import label_studio_venv

    packages = sorted(label_studio_venv().glob("lib/python3*/site-packages/label_studio"))
    if not packages:
        pytest.skip("Label Studio's venv is not installed (scripts/setup.sh)")
    source = "\n".join(p.read_text(errors="replace") for p in packages[0].rglob("*.py"))
    for name in environment(services()["label-studio"]):
        # get_env('X') reads LABEL_STUDIO_X, HEARTEX_X or X
        short = name.removeprefix("LABEL_STUDIO_")
        assert re.search(rf"['\"]({re.escape(name)}|{re.escape(short)})['\"]", source), \
            f"Label Studio's source never reads {name}"


def test_every_compose_variable_is_documented_in_env_example():
    documented = env_example()
    used = variables_used(compose()) | variables_used(gpu_override())
    missing = sorted(used - set(documented))
    assert not missing, f"used in the compose files, missing from docker/.env.example: {missing}"
    unused = sorted(set(documented) - used - COMPOSE_CLI_VARS)
    assert not unused, f"in docker/.env.example but used by no compose file: {unused}"


def test_env_example_entries_have_a_comment():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(rf"^\s*#?\s*({_NAME})=", line)
        if m and not line.lstrip().startswith("#"):
            assert i > 0 and lines[i - 1].lstrip().startswith("#") and len(lines[i - 1].strip()) > 2, \
                f".env.example: {m.group(1)} has no comment line above it"


def test_env_example_values_are_the_compose_defaults():
    """Copying .env.example changes nothing but the secrets; a variable has one default everywhere."""
    example = env_example_active()
    defaults: dict[str, set[str]] = {}
    for data in (compose(), gpu_override()):
        for name, values in defaults_used(data).items():
            defaults.setdefault(name, set()).update(values)
    for name, values in defaults.items():
        assert len(values) == 1, f"{name} has different defaults in the compose files: {sorted(values)}"
        assert example.get(name) == next(iter(values)), \
            f".env.example sets {name}={example.get(name)!r}, the compose default is {next(iter(values))!r}"
    for name in required_vars(compose()):
        assert example.get(name) == "", f"{name} is required: .env.example must leave it empty (no usable default)"


def _volume_mounts(service: dict) -> dict[str, str]:
    """named volume -> mount path (short and long syntax); bind mounts left out."""
    mounts = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            source, _, rest = entry.partition(":")
            target = rest.split(":")[0]
        else:
            if entry.get("type", "volume") != "volume":
                continue
            source, target = entry.get("source", ""), entry.get("target", "")
        if source and not source.startswith((".", "/", "~", "$")):
            mounts[source] = target
    return mounts


def test_named_volumes_are_declared_and_used():
    declared = set(compose().get("volumes") or {})
    used = set()
    for name, svc in services().items():
        mounts = _volume_mounts(svc)
        undeclared = sorted(set(mounts) - declared)
        assert not undeclared, f"{name} mounts undeclared volumes {undeclared}"
        used |= set(mounts)
    assert not sorted(declared - used), f"declared but never mounted: {sorted(declared - used)}"
    for expected in ("label-studio-data", "postgres-data", "mongo-data", "redis-data", *SHARED_VOLUMES):
        assert expected in declared


def test_shared_volumes_are_at_the_same_paths_as_the_settings():
    stack = resolved_stack()["services"]
    for volume, setting in SHARED_VOLUMES.items():
        paths = {name: _volume_mounts(stack[name]).get(volume) for name in OUR_SERVICES}
        assert None not in paths.values(), f"volume {volume} is not mounted in {paths}"
        assert len(set(paths.values())) == 1, f"volume {volume} is mounted at different paths: {paths}"
        for name in OUR_SERVICES:
            value = environment(stack[name]).get(setting)
            assert value == paths[name], f"{name}: {setting}={value!r} but the {volume} volume is at {paths[name]}"


def test_labelloop_reads_label_studios_uploads_from_its_volume_read_only():
    """LABELLOOP_LS_MEDIA_DIR is the media folder of the very volume Label Studio writes uploads to."""
    stack = resolved_stack()["services"]
    ls_data = _volume_mounts(stack["label-studio"])["label-studio-data"]  # Label Studio's data dir
    for name in OUR_SERVICES:
        ours = _volume_mounts(stack[name]).get("label-studio-data")
        assert ours, f"{name} does not mount Label Studio's data volume"
        entries = [e for e in stack[name]["volumes"] if (e if isinstance(e, str) else e.get("source", "")
                                                         ).startswith("label-studio-data")]
        assert all(e.endswith(":ro") if isinstance(e, str) else e.get("read_only") for e in entries), \
            f"{name} must mount Label Studio's data read-only"
        assert environment(stack[name])["LABELLOOP_LS_MEDIA_DIR"] == ours + "/media", name
    assert environment(stack["label-studio"]).get("LABEL_STUDIO_BASE_DATA_DIR", ls_data) == ls_data


@pytest.mark.parametrize("extra", [{}, {k: "" for k in env_example_active() if not k.startswith("LABEL_STUDIO_")
                                         and k not in SECRETS}], ids=["env-example", "all-defaults"])
def test_interpolated_environment_gives_valid_settings(monkeypatch, extra):
    """The containers' environment (with .env.example, and with every optional value empty) parses."""
    from labelloop.config import settings

    stack = resolved_stack(extra)["services"]
    for name in OUR_SERVICES:
        for key in readme_configuration_variables():
            monkeypatch.delenv(key, raising=False)
        for key, value in environment(stack[name]).items():
            monkeypatch.setenv(key, value)
        s = settings()
        for path in (s.home, s.model_dir, s.cache_dir, s.model_root, s.yolo_config_dir):
            assert path.is_absolute() and str(path).startswith("/data"), f"{name}: {path}"
        assert s.redis_url.startswith("redis://"), f"{name}: REDIS_URL {s.redis_url!r}"
        assert isinstance(logging.getLevelName(s.log_level), int), f"{name}: LOG_LEVEL {s.log_level!r}"
        assert s.label_studio_url and s.label_studio_api_key, f"{name}: no Label Studio URL or key"


def test_services_are_wired_to_each_other():
    from urllib.parse import urlsplit

    stack = resolved_stack()["services"]
    ls_env = environment(stack["label-studio"])
    pg_env = environment(stack["postgres"])
    for name in OUR_SERVICES:
        env = environment(stack[name])
        ls = urlsplit(env["LABEL_STUDIO_URL"])
        assert ls.hostname == "label-studio" and ls.port == EXPECTED_PORTS["label-studio"]
        assert env["LABEL_STUDIO_API_KEY"] == ls_env["LABEL_STUDIO_USER_TOKEN"], \
            f"{name} must use the token Label Studio is started with (when LABEL_STUDIO_API_KEY is empty)"
        assert urlsplit(env["REDIS_URL"]).hostname == "redis"
        assert urlsplit(env["FIFTYONE_DATABASE_URI"]).hostname == "mongodb"
    assert ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls_env["DJANGO_DB"] == "default" and ls_env["POSTGRE_HOST"] == "postgres"
    assert ls_env["POSTGRE_NAME"] == pg_env["POSTGRES_DB"]
    assert ls_env["POSTGRE_USER"] == pg_env["POSTGRES_USER"]
    assert ls_env["POSTGRE_PASSWORD"] == pg_env["POSTGRES_PASSWORD"]


def test_depends_on_targets_exist():
    for name, svc in services().items():
        deps = svc.get("depends_on") or {}
        items = {d: {} for d in deps} if isinstance(deps, list) else deps
        for target, spec in items.items():
            assert target in services(), f"{name} depends on unknown service {target}"
            assert target != name
            if (spec or {}).get("condition") == "service_healthy":
                assert "healthcheck" in services()[target], f"{name} waits for {target} to be healthy: no healthcheck"


def _published(service: dict) -> list[tuple[int, int]]:
    return [(port, target) for _, port, target in _bindings(service)]


def _bindings(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port; "" = every interface."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append((str(entry.get("host_ip", "")), int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {entry} is not published on a fixed host port"
        out.append((":".join(parts[:-2]), int(parts[-2]), int(parts[-1])))
    return out


def test_published_ports_bind_to_loopback_unless_configured():
    """An untouched stack is reachable from this host only; each service opens with its own variable."""
    stack = resolved_stack()["services"]
    for name, svc in stack.items():
        for address, port, _ in _bindings(svc):
            assert address == "127.0.0.1", f"{name} publishes {port} on {address or 'every interface'}"
    for name, variable in {"label-studio": "LABEL_STUDIO_BIND", "backend": "LABELLOOP_BIND",
                           "fiftyone": "FIFTYONE_BIND", "flower": "FLOWER_BIND"}.items():
        opened = resolved_stack({variable: "0.0.0.0"})["services"]
        assert {a for a, _, _ in _bindings(opened[name])} == {"0.0.0.0"}, f"{variable} does not open {name}"
        others = [n for n, svc in opened.items() if n != name and any(a != "127.0.0.1" for a, _, _ in _bindings(svc))]
        assert not others, f"{variable} also opens {others}"


def test_fiftyone_app_runs_only_with_its_profile():
    """No login, the Label Studio token, cached images: the App (and its MongoDB) are opt-in (`--profile fiftyone`)."""
    for name, svc in services().items():
        assert svc.get("profiles") == OPTIONAL.get(name), f"{name}: profiles {svc.get('profiles')}"
    for name, svc in services().items():  # a default service must not need an optional one
        if name in OPTIONAL:
            continue
        deps = svc.get("depends_on") or {}
        assert not set(deps) & set(OPTIONAL), f"{name} depends on an optional service: {sorted(deps)}"
    readme = (DOCKER / "README.md").read_text()
    assert "--profile fiftyone" in readme and "COMPOSE_PROFILES=fiftyone" in readme


def test_backend_is_authenticated_in_the_stack():
    """It listens on 0.0.0.0 in its container: basic auth and the webhook secret are required."""
    env = environment(resolved_stack()["services"]["backend"])
    assert env["BASIC_AUTH_USER"] and env["BASIC_AUTH_PASS"] == "secret-of-basic_auth_pass"
    assert env["LABELLOOP_WEBHOOK_SECRET"] == "secret-of-labelloop_webhook_secret"
    assert env["LABELLOOP_INSECURE"] == ""
    for name in OUR_SERVICES:
        assert {"LABELLOOP_WEBHOOK_SECRET", "LABELLOOP_INSECURE", "LABELLOOP_MAX_JOB_ATTEMPTS",
                "LABELLOOP_KEEP_VERSIONS"} <= set(environment(services()[name])), name


def test_published_ports_are_unique_and_match_the_commands():
    stack = resolved_stack()["services"]
    host_ports = [host for svc in stack.values() for host, _ in _published(svc)]
    assert len(host_ports) == len(set(host_ports)), f"host ports collide: {host_ports}"
    for name, port in EXPECTED_PORTS.items():
        assert _published(stack[name]) == [(port, port)], f"{name} must publish {port}:{port}"
    assert not _published(stack["redis"]) and not _published(stack["mongodb"]) and not _published(stack["postgres"])
    for name in ("backend", "fiftyone", "flower"):
        command = stack[name]["command"]
        assert int(command[command.index("--port") + 1]) == _published(stack[name])[0][1]


def test_every_service_has_a_healthcheck():
    for name, svc in services().items():
        check = svc.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable") and check.get("test") not in (["NONE"], "NONE"), f"{name}: healthcheck off"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: test must start with CMD or CMD-SHELL"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_our_healthchecks_use_the_script_shipped_in_the_image(name):
    svc = resolved_stack()["services"][name]
    test = svc["healthcheck"]["test"]
    if name == "delegated":  # no port: healthy when its database answers (`labelloop delegated --check`)
        assert test[0] == "CMD" and test[1:] == ["labelloop", "delegated", "--check"], test
        assert check_command(test[1:])["check"] is True
        return
    args = healthcheck_script_args(test)
    assert args is not None, f"{name}: healthcheck does not run healthcheck.py"
    script = next(w for w in test if w.endswith("/healthcheck.py"))
    build = svc["build"]
    stages = dockerfile_stages(build_dockerfile(build))
    assert copy_destination(stages, build["target"], "docker/healthcheck.py") == script
    if name in WORKERS:
        assert args == ["worker"]
    else:
        assert args[0] == "http", f"{name}: expected an HTTP check"
        port = int(svc["command"][svc["command"].index("--port") + 1])
        assert re.match(rf"http://127\.0\.0\.1:{port}/", args[1]), f"{name}: checks {args[1]}, serves on {port}"
        if name == "backend":
            assert args[1].endswith("/health")


@pytest.mark.parametrize("name", ["fiftyone", "delegated"])
def test_fiftyone_finds_the_plugin_in_the_image(name):
    svc = resolved_stack()["services"][name]
    stages = dockerfile_stages(build_dockerfile(svc["build"]))
    plugins = copy_destination(stages, svc["build"]["target"], "fiftyone_plugins/")
    assert environment(svc)["FIFTYONE_PLUGINS_DIR"] == plugins
    assert stages[svc["build"]["target"]]["env"].get("FIFTYONE_PLUGINS_DIR") == plugins
    assert (ROOT / "fiftyone_plugins" / "labelloop" / "fiftyone.yml").is_file()


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_build_dockerfile_exists_and_copies_only_repo_paths(name):
    build = resolved_stack()["services"][name]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT, f"{name}: build context {context} is not the repository root"
    dockerfile = build_dockerfile(build)
    assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
    stages = dockerfile_stages(dockerfile)
    target = build.get("target")
    assert target is None or target in stages, f"{name}: no stage {target} in {dockerfile.name}"
    stage = stages[target or list(stages)[-1]]
    for arg in build.get("args") or {}:
        assert arg in stage["args"] | stage["global_args"], f"{name}: build arg {arg} is not an ARG of {dockerfile.name}"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} must keep the build context small (.venv is gigabytes)"
    assert dockerignore_excludes(ignore, ".venv/bin/python") and dockerignore_excludes(ignore, ".git/config")
    for stage in stages.values():
        for source, _ in stage["copies"]:
            assert not source.startswith(("/", "..")), f"COPY {source} reaches outside the context"
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            files = repo_files(source)
            assert files, f"COPY {source}: nothing to copy"
            dropped = [f for f in files if dockerignore_excludes(ignore, f)]
            assert not dropped, f"COPY {source}: {ignore.name} leaves out {dropped[:5]}"


def test_torch_variants_are_the_ones_the_dockerfile_knows():
    dockerfile = build_dockerfile(our_builds()["backend"])
    text = dockerfile.read_text()
    block = text.split('case "${TORCH_VARIANT}" in', 1)[1].split("esac", 1)[0]
    known = set(re.findall(r"^\s*([a-z0-9]+)\)", block, re.M))
    assert known == {"cpu", "cuda"}
    values = {env_example_active()["TORCH_VARIANT"], *defaults_used(compose())["TORCH_VARIANT"]}
    values |= {str(b["args"]["TORCH_VARIANT"]) for b in our_builds(gpu_override()).values()}
    assert values <= known, f"TORCH_VARIANT values {values} not all handled by the Dockerfile ({known})"
    for build in our_builds().values():
        assert build["args"]["TORCH_VARIANT"] == "cpu", "the default stack is the CPU variant"


def test_gpu_override_adds_a_gpu_to_the_train_worker():
    override = gpu_override()["services"]
    assert set(override) <= set(services()), f"override names unknown services {set(override) - set(services())}"
    train = override["worker-train"]
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert train["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert train["image"] != services()["worker-train"]["image"], "the CUDA build needs its own image tag"
    assert "deploy" not in services()["worker-train"], "the base stack must run on hosts without a GPU"


# --------------------------------------------------------------------------- docker/healthcheck.py


@functools.cache
def healthcheck_module():
    spec = importlib.util.spec_from_file_location("labelloop_docker_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_script_http():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        hc = healthcheck_module()
        assert hc.main(["http", f"{base}/health"]) == 0
        assert hc.main(["http", f"{base}/other"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert hc.main(["http", f"{base}/health"]) == 1  # nothing listens any more
    assert hc.main(["bogus"]) == 2
