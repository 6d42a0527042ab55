"""All configuration, read from environment variables with defaults that need no tuning.

Settings are read when asked for (``settings()``), not at import, so a test or a CLI flag can
change the environment first. Every variable is listed in README.md ("Configuration").
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

# label-studio-ml-backend's names for our settings: read when ours is unset, with a deprecation line (once
# per process and name); ours win when both are set. THREADS: upstream's gunicorn threads, here the threads
# doing /predict work. Upstream's WORKERS (gunicorn processes) has no equivalent: see _ignored_upstream().
UPSTREAM_ALIASES = {
    "LABEL_STUDIO_URL": "LABEL_STUDIO_HOST",
    "LABEL_STUDIO_API_KEY": "LABEL_STUDIO_ACCESS_TOKEN",
    "LABELLOOP_SCORE_THRESHOLD": "MODEL_SCORE_THRESHOLD",
    "LABELLOOP_PREDICT_WORKERS": "THREADS",
}
_warned: set[str] = set()


def _warn_once(name: str, message: str) -> None:
    if name not in _warned:
        _warned.add(name)
        logging.getLogger("labelloop.config").warning("labelloop: %s", message)


def _env(name: str, default: str = "") -> str:
    value = os.environ.get(name, default).strip()
    alias = UPSTREAM_ALIASES.get(name)
    upstream = os.environ.get(alias, "").strip() if alias else ""
    if upstream and os.environ.get(name, "").strip():
        _warn_once(alias, f"{alias} (label-studio-ml-backend's name) is ignored: {name} is set and wins")
    elif upstream:
        _warn_once(alias, f"{alias} (label-studio-ml-backend's name) is deprecated: read as {name}; rename it")
        return upstream
    return value


def _ignored_upstream() -> None:
    """Upstream's WORKERS started that many gunicorn processes. One labelloop service process holds the
    projects connected through /setup, the model cache and the webhook rate limits: several would each
    keep their own (a webhook reaching another process than /setup did is ignored), so it is not honoured."""
    if _env("WORKERS"):
        _warn_once("WORKERS", f"WORKERS={_env('WORKERS')} (label-studio-ml-backend's gunicorn processes) is "
                              "ignored: labelloop serve is one process; set LABELLOOP_PREDICT_WORKERS for "
                              "/predict threads and run more `labelloop worker` processes for training")


# An ultralytics model *name* (yolo11n.pt): one path component, a .pt suffix, nothing that could climb or hide.
WEIGHTS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.pt")


def is_weights_name(value: str) -> bool:
    return len(value) <= 100 and WEIGHTS_NAME.fullmatch(value) is not None


def _base_model(value: str, model_root: Path) -> str:
    """LABELLOOP_BASE_MODEL as a file: a path as given; a bare model name that is no file here
    (ultralytics looks in the working directory first) is MODEL_ROOT/<name>, where `labelloop serve`
    and `labelloop worker` download it when online (core/yolo_env.fetch_weights)."""
    if value and is_weights_name(value) and not Path(value).is_file():
        return str(model_root / value)
    return value


def _env_bool(name: str, default: bool = False) -> bool:
    value = _env(name)
    if not value:
        return default
    return value.lower() in ("1", "true", "yes", "on")


def _env_int(name: str, default: int | None) -> int | None:
    value = _env(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _env_float(name: str, default: float | None) -> float | None:
    value = _env(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {value!r}") from None


def _env_json(name: str) -> dict:
    value = _env(name)
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"environment variable {name} must be a JSON object: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"environment variable {name} must be a JSON object, got {value!r}")
    return parsed


@dataclass(frozen=True)
class Settings:
    home: Path
    model_dir: Path
    cache_dir: Path
    yolo_config_dir: Path
    label_studio_url: str
    label_studio_api_key: str
    allowed_hosts: tuple[str, ...]
    basic_auth_user: str
    basic_auth_pass: str
    base_model: str
    allow_custom_model_path: bool
    model_root: Path
    model_config: str
    score_threshold: float
    predict_batch: int
    max_body_bytes: int
    # the HTTP face (service/): who may call it and how much one caller can make it do
    insecure: bool  # LABELLOOP_INSECURE=true: serve without auth on a non-loopback address, on purpose
    webhook_secret: str  # shared secret Label Studio's webhook sends in X-Labelloop-Webhook-Secret
    max_webhook_bytes: int
    trigger_burst: int  # per-project token bucket for webhook-triggered jobs: capacity ...
    trigger_rate: float  # ... and refill (tokens per second)
    max_tasks_per_predict: int
    predict_workers: int  # threads doing /predict work, apart from the pool that serves the rest
    fetch_timeout: float
    max_image_bytes: int
    max_image_pixels: int  # width x height read from the header, refused before decoding
    fetch_deadline: float  # seconds for one whole image fetch (httpx timeouts are per read)
    image_cache_bytes: int  # the media cache's size cap; least recently used files go first
    device: str
    epochs: int | None
    imgsz: int | None
    batch: int | None
    train_minutes: float | None
    train_args: dict
    redis_url: str
    visibility_timeout: int
    keep_versions: int  # registry retention: newest versions kept per project (plus serving and hand-promoted)
    max_job_attempts: int  # a job whose worker died this many times is failed, not delivered again
    pending_ttl: int  # seconds a pending (coalescing) job slot lives unless re-confirmed alive
    warm_start_steps: int  # contrastive steps of a project's self-supervised warm start; 0: no warm start
    log_level: str
    # Label Studio's media folder (the one holding upload/), when this machine shares it: /data/upload/
    # images are read from it instead of over HTTP (media.py, LocalUploads). None: always HTTP.
    ls_media_dir: Path | None = None
    offline: bool = False  # LABELLOOP_OFFLINE=true: never download weights by name (core/yolo_env.fetch_weights)


def settings() -> Settings:
    _ignored_upstream()
    home = Path(_env("LABELLOOP_HOME", str(Path.home() / ".labelloop"))).expanduser()
    model_root = Path(_env("MODEL_ROOT", str(home / "weights"))).expanduser()
    hosts = tuple(h.strip().lower() for h in _env("LABELLOOP_ALLOWED_HOSTS").split(",") if h.strip())
    return Settings(
        home=home,
        model_dir=Path(_env("MODEL_DIR", str(home / "models"))).expanduser(),
        cache_dir=Path(_env("LABELLOOP_CACHE_DIR", str(home / "cache"))).expanduser(),
        yolo_config_dir=Path(_env("YOLO_CONFIG_DIR", str(home / "ultralytics"))).expanduser(),
        label_studio_url=_env("LABEL_STUDIO_URL").rstrip("/"),
        label_studio_api_key=_env("LABEL_STUDIO_API_KEY"),
        allowed_hosts=hosts,
        basic_auth_user=_env("BASIC_AUTH_USER"),
        basic_auth_pass=_env("BASIC_AUTH_PASS"),
        base_model=_base_model(_env("LABELLOOP_BASE_MODEL"), model_root),
        allow_custom_model_path=_env_bool("ALLOW_CUSTOM_MODEL_PATH"),
        model_root=model_root,
        model_config=_env("LABELLOOP_MODEL_CONFIG"),
        score_threshold=_env_float("LABELLOOP_SCORE_THRESHOLD", 0.5),
        predict_batch=_env_int("LABELLOOP_PREDICT_BATCH", 16),
        max_body_bytes=int(_env_float("LABELLOOP_MAX_BODY_MB", 32.0) * 1024 * 1024),
        insecure=_env("LABELLOOP_INSECURE").lower() == "true",
        webhook_secret=_env("LABELLOOP_WEBHOOK_SECRET"),
        max_webhook_bytes=int(_env_float("LABELLOOP_MAX_WEBHOOK_MB", 4.0) * 1024 * 1024),
        trigger_burst=max(1, _env_int("LABELLOOP_TRIGGER_BURST", 200)),
        trigger_rate=max(0.0, _env_float("LABELLOOP_TRIGGER_RATE", 2.0)),
        max_tasks_per_predict=max(1, _env_int("LABELLOOP_MAX_TASKS_PER_PREDICT", 1000)),
        predict_workers=max(1, _env_int("LABELLOOP_PREDICT_WORKERS", 2)),
        fetch_timeout=_env_float("LABELLOOP_FETCH_TIMEOUT", 10.0),
        max_image_bytes=int(_env_float("LABELLOOP_MAX_IMAGE_MB", 50.0) * 1024 * 1024),
        max_image_pixels=_env_int("LABELLOOP_MAX_IMAGE_PIXELS", 50_000_000),
        fetch_deadline=_env_float("LABELLOOP_FETCH_DEADLINE_S", 30.0),
        image_cache_bytes=int(_env_float("LABELLOOP_IMAGE_CACHE_MB", 2048.0) * 1024 * 1024),
        device=_env("LABELLOOP_DEVICE"),
        epochs=_env_int("LABELLOOP_EPOCHS", None),
        imgsz=_env_int("LABELLOOP_IMGSZ", None),
        batch=_env_int("LABELLOOP_BATCH", None),
        train_minutes=_env_float("LABELLOOP_TRAIN_MINUTES", None),
        train_args=_env_json("LABELLOOP_TRAIN_ARGS"),
        redis_url=_env("REDIS_URL", "redis://127.0.0.1:6379/0"),
        visibility_timeout=_env_int("LABELLOOP_VISIBILITY_TIMEOUT", 7200),
        keep_versions=max(1, _env_int("LABELLOOP_KEEP_VERSIONS", 10)),
        max_job_attempts=max(1, _env_int("LABELLOOP_MAX_JOB_ATTEMPTS", 3)),
        pending_ttl=max(10, _env_int("LABELLOOP_PENDING_TTL", 900)),
        warm_start_steps=min(10_000, max(0, _env_int("LABELLOOP_WARM_START_STEPS", 300))),
        log_level=_env("LOG_LEVEL", "INFO").upper(),
        ls_media_dir=Path(_env("LABELLOOP_LS_MEDIA_DIR")).expanduser() if _env("LABELLOOP_LS_MEDIA_DIR") else None,
        offline=_env_bool("LABELLOOP_OFFLINE"),
    )
