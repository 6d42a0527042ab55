"""``labelloop`` command line: serve the ML backend, generate data, train, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from labelloop import __version__
from labelloop.config import is_weights_name, settings
from labelloop.errors import LabelloopError

log = logging.getLogger("labelloop.cli")


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * min(1.0, max(0.0, fraction))))
        bar.set_postfix_str(message[:80])
        bar.refresh()

    return bar, update


def fetch_named_base_model() -> Path | None:
    """LABELLOOP_BASE_MODEL=yolo11n.pt, a model name that is no local file: fetched into MODEL_ROOT before
    the service or a worker starts (config reads the name as MODEL_ROOT/<name>), so no Label Studio
    request waits for a download. Offline or failed: logged with what to do, and the process starts anyway
    (versions trained by labelloop do not need it). Returns the file when it is there."""
    import os

    name = os.environ.get("LABELLOOP_BASE_MODEL", "").strip()
    env = settings()
    if name and Path(env.base_model).is_file():
        return Path(env.base_model)
    if not name or not is_weights_name(name):
        return None  # unset, or a path: the service reports a missing file itself
    from labelloop.core.yolo_env import fetch_weights

    try:
        return fetch_weights(name, env.model_root, offline=env.offline, what="LABELLOOP_BASE_MODEL")
    except LabelloopError as exc:
        log.error("%s; starting without it: projects that need the base model get an error at /setup", exc)
        return None


def cmd_serve(args) -> int:
    import uvicorn

    from labelloop.service.guards import bind_refusal

    env = settings()
    refusal = bind_refusal(args.host, env)
    if refusal:  # secure by default: no unauthenticated backend on a reachable address by accident
        print(f"labelloop serve: {refusal}", file=sys.stderr)
        return 2
    fetch_named_base_model()
    if env.insecure and not env.basic_auth_user:
        logging.getLogger("labelloop").warning("LABELLOOP_INSECURE=true: serving on %s without authentication",
                                               args.host)
    uvicorn.run("labelloop.service.app:build_app_with_limits", factory=True, host=args.host, port=args.port,
                log_level=settings().log_level.lower(), access_log=args.access_log)
    return 0


def cmd_install_webhook_secret(args) -> int:
    """Add LABELLOOP_WEBHOOK_SECRET to the webhook Label Studio made when the backend was connected."""
    from labelloop.labelstudio.client import StudioClient, StudioError

    env = settings()
    if not env.webhook_secret:
        print("LABELLOOP_WEBHOOK_SECRET is not set: nothing to install", file=sys.stderr)
        return 2
    try:
        hook = StudioClient.from_settings(env).install_webhook_secret(args.project, args.backend_url,
                                                                      env.webhook_secret)
    except StudioError as exc:
        print(f"cannot install the webhook secret: {exc}", file=sys.stderr)
        return 1
    print(f"webhook {hook.get('id')} of project {args.project} ({hook.get('url')}) now sends the secret header")
    return 0


QUEUES = {"train": "labelloop.train", "predict": "labelloop.predict"}


def cmd_worker(args) -> int:
    """Become a Celery worker (exec), with defaults that suit torch jobs."""
    import os
    import socket

    names = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown:
        print(f"unknown queue(s) {unknown}; choose from {sorted(QUEUES)}", file=sys.stderr)
        return 2
    hostname = args.hostname or f"{'+'.join(names)}@{socket.gethostname()}"
    fetch_named_base_model()  # before exec: the children that train start from it
    argv = [sys.executable, "-m", "celery", "-A", "labelloop.tasks.celery_app:app", "worker",
            "-Q", ",".join(QUEUES[q] for q in names), "-c", str(args.concurrency), "--pool", args.pool,
            # torch keeps memory between jobs: recycle the child process now and then
            "--max-tasks-per-child", str(args.max_tasks_per_child),
            "--max-memory-per-child", str(args.max_memory_mb * 1024),
            "-n", hostname, "--loglevel", settings().log_level, "-E"]
    print("exec:", " ".join(argv), flush=True)
    os.execv(sys.executable, argv)
    return 0  # not reached


def flower_command(host: str, port: int, env=None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of Celery Flower over labelloop's broker: the jobs, workers and queues live.

    The basic-auth pair goes through Flower's own FLOWER_BASIC_AUTH variable, not argv, so it never
    shows in the process list.
    """
    import os

    env = env or settings()
    argv = [sys.executable, "-m", "celery", "-A", "labelloop.tasks.celery_app:app", "flower",
            f"--address={host}", f"--port={port}", "--url_prefix=", "--purge_offline_workers=300"]
    child_env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    if env.basic_auth_user:
        child_env["FLOWER_BASIC_AUTH"] = f"{env.basic_auth_user}:{env.basic_auth_pass}"
    return argv, child_env


def cmd_flower(args) -> int:
    """Become Celery Flower (exec); loopback only unless basic auth is set, like `labelloop serve`."""
    import os

    from labelloop.service.guards import bind_refusal

    refusal = bind_refusal(args.host, settings())
    if refusal:
        print(f"labelloop flower: {refusal}", file=sys.stderr)
        return 2
    argv, child_env = flower_command(args.host, args.port)
    print("exec:", " ".join(argv), flush=True)
    os.execve(sys.executable, argv, child_env)
    return 0  # not reached


def cmd_data_shapes(args) -> int:
    from tqdm import tqdm

    from labelloop.dev.shapes import generate_shapes

    with tqdm(total=args.n, desc="generating shapes", unit="img") as bar:
        dataset = generate_shapes(args.out, n=args.n, seed=args.seed, size=args.size, noise=args.noise,
                                  max_objects=args.max_objects, progress=lambda done, total: bar.update(1))
    print(f"{len(dataset.images)} images in {dataset.images_dir}; ground truth in {Path(args.out) / 'shapes.json'}"
          f"; {len(dataset.corruptions)} injected label errors")
    return 0


def cmd_train(args) -> int:
    from labelloop.errors import reason_of
    from labelloop.workflows.pipeline import train_from_label_studio

    bar, update = _progress_bar(f"training project {args.project}")
    try:
        outcome = train_from_label_studio(args.project, update)
    except Exception as exc:
        bar.close()
        print(f"training failed: {reason_of(exc)}", file=sys.stderr)
        return 1
    bar.close()
    print(json.dumps({"version": outcome.manifest.version, "promoted": outcome.promoted, "reason": outcome.reason,
                      "metrics": outcome.manifest.metrics}, indent=2))
    return 0


def cmd_fiftyone_sync(args) -> int:
    from labelloop.fo.sync import sync_project

    bar, update = _progress_bar(f"syncing project {args.project}")
    report = sync_project(args.project, args.dataset, predict=not args.no_predict, progress=update)
    bar.close()
    print(json.dumps(report.__dict__, indent=2))
    return 0


def _celery_folds():
    from labelloop.tasks.jobs import run_folds_on_celery

    return run_folds_on_celery


def cmd_fiftyone_score(args) -> int:
    from labelloop.fo import analysis as fo_analysis
    from labelloop.fo.env import import_fiftyone

    fo = import_fiftyone()
    dataset = fo.load_dataset(args.dataset)
    bar, update = _progress_bar(args.analysis)
    try:
        if args.analysis == "mislabels":
            result = fo_analysis.compute_mislabel_scores(dataset, args.mode, args.folds, update,
                                                         fold_runner=_celery_folds() if args.celery else None)
        elif args.analysis == "uncertainty":
            result = fo_analysis.uncertainty_sampling(dataset, args.k, args.method, args.diversity, True, update)
            if args.send:
                result["label_studio"] = fo_analysis.send_to_label_studio(dataset.select(result["selected"]))
            result["selected"] = len(result["selected"])
        else:
            result = fo_analysis.compute_embeddings(dataset, args.method_2d, progress=update)
    except LabelloopError as exc:
        bar.close()
        print(f"cannot run {args.analysis}: {exc}", file=sys.stderr)
        return 1
    bar.close()
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_fiftyone_plugin(args) -> int:
    """Copy (or link) the plugin into a FIFTYONE_PLUGINS_DIR of the user's choosing."""
    import os
    import shutil

    source = Path(__file__).resolve().parents[1] / "fiftyone_plugins" / "labelloop"
    target_root = Path(args.dir or os.environ.get("FIFTYONE_PLUGINS_DIR") or Path.home() / "fiftyone" / "__plugins__")
    target = target_root / "labelloop"
    target_root.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    if args.copy:
        shutil.copytree(source, target)
    else:
        target.symlink_to(source, target_is_directory=True)
    print(f"plugin installed at {target}; start the App with FIFTYONE_PLUGINS_DIR={target_root}")
    return 0


def cmd_app(args) -> int:
    """FiftyOne's App server, its /media route limited to labelloop's media folders (fo/app.py)."""
    from labelloop.fo.app import serve_app

    serve_app(args.address, args.port)
    return 0


def cmd_stack(args) -> int:
    from labelloop.dev import stack

    if args.action == "up":
        state = stack.up(workers=not args.no_workers, app=not args.no_app)
        ls = state["label_studio"]
        print(f"Label Studio  {state['services']['label-studio']['url']}  login {ls['username']} / {ls['password']}"
              f"  (API token {ls['token']})")
        print(f"ML backend    {state['services']['backend']['url']}")
        if "flower" in state["services"]:
            print(f"Flower        {state['services']['flower']['url']}  (Celery jobs, workers, queues)")
        if "fiftyone" in state["services"]:
            print(f"FiftyOne App  {state['services']['fiftyone']['url']}")
        print('point this shell\'s labelloop commands at it: eval "$(labelloop stack env)"')
        print("stop everything with: labelloop stack down")
    elif args.action == "env":
        print(stack.shell_exports())
    elif args.action == "down":
        stack.down()
    elif args.action == "status":
        report = stack.status()
        for name, info in report.items():
            state = "running" if info["running"] else "stopped"
            health = "" if info.get("healthy") is None else (" healthy" if info["healthy"] else " UNHEALTHY")
            print(f"{name:15s} {state}{health}  {info.get('url') or ''}")
        return 0 if all(i["running"] for i in report.values()) else 3
    else:
        print(stack.log_tail(args.service, args.lines))
    return 0


def cmd_demo(args) -> int:
    from labelloop.dev.demo import run_demo

    return run_demo(args)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except defaults that say nothing (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of ``labelloop`` and, through add_subparsers' parser_class, of every subcommand."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="labelloop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"labelloop {__version__}",
                        help="print labelloop's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; any but loopback needs BASIC_AUTH_USER/PASS "
                            "or LABELLOOP_INSECURE=true")
    serve.add_argument("--port", type=int, default=9090, help="port to listen on")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=cmd_serve)

    hook = sub.add_parser("install-webhook-secret",
                          help="make a project's Label Studio webhook send LABELLOOP_WEBHOOK_SECRET (after "
                               "connecting the backend in the Label Studio UI)")
    hook.add_argument("--project", required=True, type=int, help="Label Studio project id")
    hook.add_argument("--backend-url", required=True,
                      help="the backend URL as entered in Label Studio's model connection, e.g. http://backend:9090")
    hook.set_defaults(func=cmd_install_webhook_secret)

    worker = sub.add_parser("worker", help="run a Celery worker for training and/or prediction jobs")
    worker.add_argument("--queues", default="train,predict",
                        help="comma-separated: train (GPU-worthy), predict (CPU is fine)")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at once (each uses all its cores)")
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"], help="Celery pool")
    worker.add_argument("--max-tasks-per-child", type=int, default=20,
                        help="recycle a child after this many jobs (torch keeps memory between jobs)")
    worker.add_argument("--max-memory-mb", type=int, default=6000, help="recycle a child above this resident size")
    worker.add_argument("--hostname", default=None, help="Celery node name (default <queues>@<host>)")
    worker.set_defaults(func=cmd_worker)

    flower = sub.add_parser("flower", help="Celery Flower: live jobs, workers and queues (basic auth as for serve)")
    flower.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but loopback needs BASIC_AUTH_USER/_PASS")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)

    data = sub.add_parser("data", help="embedded data generators")
    data_sub = data.add_subparsers(dest="generator", required=True)
    shapes = data_sub.add_parser("shapes", help="synthetic shapes with exact ground truth and optional label noise")
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--n", type=int, default=200, help="number of images")
    shapes.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    shapes.add_argument("--size", type=int, default=160, help="image side in pixels")
    shapes.add_argument("--noise", type=float, default=0.0, help="fraction of images with one injected label error")
    shapes.add_argument("--max-objects", type=int, default=4, help="most shapes in one image")
    shapes.set_defaults(func=cmd_data_shapes)

    train = sub.add_parser("train", help="train a new model version for a Label Studio project (reads its API)")
    train.add_argument("--project", required=True, type=int, help="Label Studio project id")
    train.set_defaults(func=cmd_train)

    fo_cmd = sub.add_parser("fiftyone", help="the FiftyOne side: sync a project, run analyses, install the plugin")
    fo_sub = fo_cmd.add_subparsers(dest="fo_command", required=True)
    sync = fo_sub.add_parser("sync", help="create/update the FiftyOne dataset of a Label Studio project")
    sync.add_argument("--project", type=int, required=True)
    sync.add_argument("--dataset", default=None, help="dataset name (default labelloop-project-<id>)")
    sync.add_argument("--no-predict", action="store_true", help="do not predict with the version in service")
    sync.set_defaults(func=cmd_fiftyone_sync)
    score = fo_sub.add_parser("score", help="mislabels | uncertainty | embeddings on a synced dataset")
    score.add_argument("analysis", choices=["mislabels", "uncertainty", "embeddings"], help="what to compute")
    score.add_argument("--dataset", required=True, help="a dataset made by `labelloop fiftyone sync`")
    score.add_argument("--mode", choices=["in_sample", "out_of_sample"], default="in_sample",
                       help="mislabels: the served model's outputs, or K-fold models trained for it")
    score.add_argument("--folds", type=int, default=5, help="mislabels out_of_sample: number of folds")
    score.add_argument("--celery", action="store_true", help="out-of-sample folds as Celery jobs")
    score.add_argument("--method", choices=["least_confidence", "margin", "entropy"], default="least_confidence",
                       help="uncertainty: how a sample's uncertainty is measured")
    score.add_argument("--k", type=int, default=20, help="uncertainty: how many samples to pick")
    score.add_argument("--diversity", action="store_true", help="uncertainty: spread the pick over the embeddings")
    score.add_argument("--send", action="store_true", help="send the uncertainty pick to Label Studio as a tab")
    score.add_argument("--method-2d", choices=["umap", "pca"], default="umap", help="embeddings: the 2-D map")
    score.set_defaults(func=cmd_fiftyone_score)
    plugin = fo_sub.add_parser("install-plugin", help="link (or --copy) the plugin into FIFTYONE_PLUGINS_DIR")
    plugin.add_argument("--dir", default=None,
                        help="target plugins folder (default $FIFTYONE_PLUGINS_DIR, else ~/fiftyone/__plugins__)")
    plugin.add_argument("--copy", action="store_true", help="copy the plugin instead of linking it")
    plugin.set_defaults(func=cmd_fiftyone_plugin)

    app = sub.add_parser("app", help="run the FiftyOne App (with the plugin); /media serves only the datasets' "
                                     "media folders and LABELLOOP_APP_MEDIA_ROOTS")
    app.add_argument("--address", default="127.0.0.1", help="address to listen on (the App has no login)")
    app.add_argument("--port", type=int, default=5151, help="port to listen on")
    app.set_defaults(func=cmd_app)

    stack_cmd = sub.add_parser("stack", help="the whole stack as local processes: up | down | status | logs | env")
    stack_cmd.add_argument("action", choices=["up", "down", "status", "logs", "env"],
                           help="env prints the exports that point a shell at the running stack")
    stack_cmd.add_argument("service", nargs="?", default="backend", help="for logs: which service")
    stack_cmd.add_argument("--lines", type=int, default=50, help="for logs: how many of the last lines")
    stack_cmd.add_argument("--no-workers", action="store_true", help="up: without the Celery workers")
    stack_cmd.add_argument("--no-app", action="store_true", help="up: without the FiftyOne App")
    stack_cmd.set_defaults(func=cmd_stack)

    demo = sub.add_parser("demo", help="the main job: the whole loop on the embedded data, with a report")
    demo.add_argument("--workdir", default=None, help="where data and the report go (default $LABELLOOP_HOME/demo)")
    demo.add_argument("--quick", action="store_true", help="fewer images and rounds: a few minutes on 2 CPU cores")
    demo.add_argument("--no-app", action="store_true", help="do not start the FiftyOne App")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, settings().log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP call drowns the CLI's own output
    try:
        return int(args.func(args) or 0)
    except LabelloopError as exc:  # our own errors say what to do: no traceback for them
        print(f"labelloop: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
