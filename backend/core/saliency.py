"""Local explanations: where in an image the served version looked (EigenCAM on its backbone).

EigenCAM (Muhammad & Yeasin, 2020) needs no gradients and no class: the activations of the last feature
layer before the head (C channels on an h x w grid) are projected onto their first principal component,
which for a trained model is the dominant "something is here" direction; the projection, upsampled to the
image, is the map. The component's sign is chosen so that the map agrees with the activations' mean (a
principal component has no sign of its own), negatives are clipped, and the map is scaled to [0, 1].

The maps are computed during the engine's own forward pass (ultralytics ``predict`` with a hook on that
layer), so they explain exactly the model that serves predictions; they are mapped back from the model's
input (classification: resized shorter side + centre crop; detection / segmentation: letterbox) to the
original image. ``bench/saliency.py`` measures their cost against the plain forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from labelloop.core.predict import LoadedModel


def eigen_projection(activations: np.ndarray) -> np.ndarray:
    """(C, h, w) activations → (h, w) map in [0, 1]: the first principal component's projection, signed to
    agree with the mean activation, negatives clipped."""
    c, h, w = activations.shape
    flat = activations.reshape(c, h * w).T.astype(np.float64)  # locations x channels
    centred = flat - flat.mean(axis=0, keepdims=True)
    if not np.any(centred):
        return np.zeros((h, w), dtype=np.float32)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projection = centred @ vt[0]
    mean = flat.mean(axis=1)
    if np.std(mean) > 0 and np.corrcoef(projection, mean)[0, 1] < 0:
        projection = -projection
    projection = np.clip(projection, 0.0, None)
    top = projection.max()
    return (projection / top if top > 0 else projection).reshape(h, w).astype(np.float32)


def _to_original(cam: np.ndarray, input_hw: tuple[int, int], original_hw: tuple[int, int], task: str) -> np.ndarray:
    """A map on the model's input grid → the original image's pixels."""
    import cv2

    in_h, in_w = input_hw
    h0, w0 = original_hw
    on_input = cv2.resize(cam, (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    if task == "classify":  # resize the shorter side to the input, then a centre crop
        scale = in_h / min(h0, w0)
        rh, rw = round(h0 * scale), round(w0 * scale)
        full = np.zeros((rh, rw), dtype=np.float32)
        top, left = (rh - in_h) // 2, (rw - in_w) // 2
        full[max(0, top): top + in_h, max(0, left): left + in_w] = on_input[max(0, -top): rh - top, max(0, -left): rw - left]
        return cv2.resize(full, (w0, h0), interpolation=cv2.INTER_LINEAR)
    gain = min(in_h / h0, in_w / w0)  # letterbox: scaled to fit, padded evenly
    new_h, new_w = round(h0 * gain), round(w0 * gain)
    top, left = (in_h - new_h) // 2, (in_w - new_w) // 2
    inside = on_input[top: top + new_h, left: left + new_w]
    return cv2.resize(inside, (w0, h0), interpolation=cv2.INTER_LINEAR)


def _network(model: LoadedModel):
    """The torch module ultralytics' predictor runs (its AutoBackend holds its own, fused, copy)."""
    if getattr(model.yolo, "predictor", None) is None:  # not warmed: one predict builds the predictor
        with model.lock:
            model.yolo.predict(np.zeros((64, 64, 3), dtype=np.uint8), verbose=False)
    backend = getattr(model.yolo.predictor, "model", None)
    net = getattr(backend, "model", None)
    return net if net is not None and hasattr(net, "model") else model.yolo.model


def saliency_maps(model: LoadedModel, images: list[Path], batch: int = 16, layer: int = -2,
                  imgsz: int | None = None) -> list[np.ndarray]:
    """One EigenCAM map per image (float32, the image's height x width, in [0, 1]), in order. ``layer``: which
    of the network's layers to explain (default: the last one before the head); ``imgsz``: as
    ``predict_images`` (default: the size the model was trained at)."""
    layers = _network(model).model
    captured: list[Any] = []
    shapes: list[tuple[int, int]] = []
    hooks = [layers[layer].register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float().cpu())),
             layers[0].register_forward_hook(lambda _m, inputs, _o: shapes.append(tuple(inputs[0].shape[-2:])))]
    maps: list[np.ndarray] = []
    try:
        for start in range(0, len(images), batch):
            chunk = [str(p) for p in images[start: start + batch]]
            captured.clear()
            shapes.clear()
            with model.lock:
                results = model.yolo.predict(chunk, verbose=False, batch=len(chunk),
                                             **({"imgsz": imgsz} if imgsz else {}))
            activations = captured[-1].numpy()  # the last forward call is this batch's
            for k, result in enumerate(results):
                h0, w0 = (int(v) for v in result.orig_shape)
                cam = eigen_projection(activations[k])
                maps.append(_to_original(cam, shapes[-1], (h0, w0), model.task))
    finally:
        for hook in hooks:
            hook.remove()
    return [np.clip(m, 0.0, 1.0).astype(np.float32) for m in maps]


def share_inside(saliency: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Share of a map's mass inside a box (x1, y1, x2, y2 in fractions of the image): how much of the
    explanation falls on the object (a uniform map scores the box's area)."""
    h, w = saliency.shape
    x1, y1, x2, y2 = int(box[0] * w), int(box[1] * h), int(np.ceil(box[2] * w)), int(np.ceil(box[3] * h))
    total = float(saliency.sum())
    return float(saliency[y1:y2, x1:x2].sum() / total) if total > 0 else 0.0
