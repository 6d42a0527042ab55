"""Benchmark: what a saliency map (EigenCAM, ``core/saliency.py``) costs next to the plain forward pass.

Same machine, same images, same weights, one run: for a classifier at 64 px (labelloop's small-image
architecture) and a yolov8n detector at 160 px, the milliseconds per image of ultralytics ``predict`` (batch
16, local files) and of ``saliency_maps`` (the same predict with a hook on the layer before the head, the
principal-component projection, the mapping back to the image), median of ``--repeats``. Weights are the
architectures' own initial ones (built from their yaml: nothing is downloaded; the cost does not depend on
what the weights learned). Appends a markdown table to bench/figures/saliency.md.

Usage: ``.venv/bin/python bench/saliency.py [--images 64] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figures", default=str(HERE / "figures"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-saliency-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))

    from labelloop.core.predict import load_model
    from labelloop.core.recipe import CONFIG_DIR
    from labelloop.core.saliency import saliency_maps
    from labelloop.core.yolo_env import import_yolo
    from labelloop.dev.shapes import generate_shapes

    rows = []
    for name, config, size in (("classifier, 64 px", str(CONFIG_DIR / "labelloop-cls-small.yaml"), 64),
                               ("detector yolov8n, 160 px", "yolov8n.yaml", 160)):
        data = generate_shapes(work / f"images-{size}", n=args.images, seed=3, size=size, max_objects=1,
                               style="simple")
        paths = [data.images_dir / im.file for im in data.images]
        model_file = work / f"{Path(config).stem}.pt"
        built = import_yolo()(config)
        built.model.names = {0: "circle", 1: "square", 2: "triangle", 3: "star"}
        built.save(str(model_file))
        model = load_model(model_file, Path(config).stem)
        raw, cam = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for start in range(0, len(paths), 16):
                model.yolo.predict([str(p) for p in paths[start: start + 16]], verbose=False, batch=16, imgsz=size)
            raw.append((time.perf_counter() - t0) / len(paths))
            t0 = time.perf_counter()
            saliency_maps(model, paths, imgsz=size)
            cam.append((time.perf_counter() - t0) / len(paths))
        rows.append((name, statistics.median(raw) * 1000, statistics.median(cam) * 1000))
        print(f"{name}: predict {rows[-1][1]:.2f} ms/image, saliency {rows[-1][2]:.2f} ms/image "
              f"({rows[-1][2] / rows[-1][1]:.2f}x)", flush=True)

    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    table = [f"\n## Run {stamp} ({platform.node()}, {os.cpu_count()} CPU cores)\n",
             f"{args.images} generated images, batch 16, median of {args.repeats}.\n",
             "| model | predict, ms/image | saliency map, ms/image | ratio |", "|---|---|---|---|"]
    table += [f"| {name} | {raw:.2f} | {cam:.2f} | {cam / raw:.2f}x |" for name, raw, cam in rows]
    out = Path(args.figures) / "saliency.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Saliency maps (EigenCAM) against the forward pass\n")
    with out.open("a") as fh:
        fh.write("\n".join(table) + "\n")
    print(f"table appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
