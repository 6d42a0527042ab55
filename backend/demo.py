"""``labelloop demo``: the main job on the embedded data.

Today: generate the shapes dataset, train a model on its labels through the same engine the
Celery jobs use, show what it predicts with scores, then serve it as the ML backend for any Label
Studio project with the printed label config, and print how to connect Label Studio.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import settings
from .labelconfig import parse_label_config
from .media import LocalFileFetcher
from .pipeline import predict_tasks, resolve_model, train_new_version
from .registry import Registry
from .shapes import generate_shapes, label_config, to_label_studio_tasks

DEMO_PROJECT = "demo"


def run_demo(args) -> int:
    from .cli import _progress_bar

    env = settings()
    workdir = Path(args.workdir or env.home / "demo").expanduser()
    task_type = args.task
    print(f"== 1/4 generating {args.n} shapes images in {workdir / 'data'}")
    dataset = generate_shapes(workdir / "data", n=args.n, seed=0,
                              max_objects=1 if task_type == "classification" else 4)
    config = label_config(task_type)
    spec = parse_label_config(config)
    tasks = to_label_studio_tasks(dataset, task_type)

    print(f"== 2/4 training a {task_type} model (settings chosen from the data)")
    registry = Registry(workdir / "models")
    bar, update = _progress_bar("training")
    outcome = train_new_version(registry, DEMO_PROJECT, tasks, spec, LocalFileFetcher(), update)
    bar.close()
    print(f"   {outcome.reason}")
    print("   tuning-split metrics: " + json.dumps({k: round(v, 3) for k, v in outcome.manifest.metrics.items()}))

    print("== 3/4 predictions with scores (low score = least confident = review first)")
    model = resolve_model(registry, DEMO_PROJECT, spec)
    preds = predict_tasks(tasks[:8], spec, model, LocalFileFetcher())
    for task, pred in sorted(zip(tasks[:8], preds), key=lambda tp: tp[1].score or 0):
        labels = [r["value"].get(spec.result_type, [None])[0] for r in pred.result]
        print(f"   task {task['id']:>3}  score {pred.score:.3f}  {len(labels)} region(s) {labels[:6]}")

    weights = outcome.manifest.weights
    print("== 4/4 serving it as a Label Studio ML backend")
    print(f"""
   Label Studio (1.23) needs, for a backend on a local address:
       ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true
   1. Create a project with this label config:
       {config}
   2. Import images (e.g. {dataset.images_dir}/*.png).
   3. Settings → Model → Connect Model → URL http://<this host>:{args.port}
   4. Data Manager → select tasks → Actions → Retrieve Predictions.
   The backend needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (legacy or personal access token)
   to fetch uploaded images. Weights: {weights}
""")
    if args.no_serve:
        return 0
    os.environ["LABELLOOP_BASE_MODEL"] = str(weights)  # serve the demo model for any project
    import uvicorn

    uvicorn.run("labelloop.service:build_app_with_limits", factory=True, host="0.0.0.0", port=args.port,
                log_level="info")
    return 0
