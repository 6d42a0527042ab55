"""predict_tasks overlaps fetching and inference (issue 14): batch k is predicted while the images of
batch k+1 are fetched, bounded, with one result per task in task order and each task's error its own.

The model and the fetcher are stand-ins that record when they run (no ultralytics, no server): what
is checked is the scheduling and bookkeeping of ``labelloop.workflows.pipeline.predict_tasks`` and
``labelloop.labelstudio.media.Prefetch``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from labelloop.core.labelconfig import parse_label_config
from labelloop.core.predict import ImagePrediction
from labelloop.dev.shapes import label_config
from labelloop.labelstudio.media import MediaError, Prefetch
from labelloop.workflows import pipeline

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`

SPEC = parse_label_config(label_config("detection"))
FETCH_S, INFER_S = 0.03, 0.06


class Model:
    version = "v-test"


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple[str, float, float, object]] = []  # (what, start, end, detail)

    def add(self, what, start, end, detail):
        with self.lock:
            self.events.append((what, start, end, detail))

    def of(self, what):
        with self.lock:
            return [e for e in self.events if e[0] == what]


class AheadFetcher:
    """A fetcher with ``fetch_ahead`` (as MediaFetcher): each image takes FETCH_S; "bad" URLs fail."""

    def __init__(self, recorder: Recorder, workers: int = 4):
        self.recorder, self.workers = recorder, workers
        self.windows: list[int] = []

    def _one(self, url: str):
        start = time.perf_counter()
        time.sleep(FETCH_S)
        self.recorder.add("fetch", start, time.perf_counter(), url)
        if "bad" in url:
            return MediaError(f"HTTP 404 fetching {url}", kind="http")
        return Path(f"/images/{url}")

    def fetch_ahead(self, urls, window=32):
        self.windows.append(window)
        return Prefetch(self._one, urls, self.workers, window)


class ManyFetcher:
    """A fetcher with only ``fetch_many`` (as LocalFileFetcher)."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def fetch_many(self, urls, workers=8):
        self.calls.append(list(urls))
        return [MediaError("no such file", kind="no_image") if "bad" in u else Path(f"/images/{u}") for u in urls]


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()

    def fake_predict_images(model, images, spec, threshold, batch=16, imgsz=None, tta=False):
        start = time.perf_counter()
        time.sleep(INFER_S)
        rec.add("infer", start, time.perf_counter(), [str(p) for p in images])
        assert len(images) <= batch
        return [ImagePrediction(width=160, height=160, score=int(Path(p).stem.split("-")[1]) / 1000) for p in images]

    monkeypatch.setattr(pipeline, "predict_images", fake_predict_images)
    return rec


def tasks_for(n: int, bad=(), missing=()) -> list[dict]:
    tasks = []
    for i in range(n):
        data = {} if i in missing else {"image": f"{'bad' if i in bad else 'img'}-{i}.png"}
        tasks.append({"id": 100 + i, "data": data})
    return tasks


def test_one_result_per_task_in_order_with_errors_kept_per_task(recorder):
    tasks = tasks_for(40, bad={3, 17}, missing={5})
    timings: dict[str, float] = {}
    out = pipeline.predict_tasks(tasks, SPEC, Model(), AheadFetcher(recorder), threshold=0.5, batch=8,
                                 timings=timings)
    assert [p.task_id for p in out] == [t["id"] for t in tasks]
    for i, p in enumerate(out):
        if i in (3, 17):
            assert p.error == f"HTTP 404 fetching bad-{i}.png" and p.error_kind == "http" and p.score is None
        elif i == 5:
            assert p.error_kind == "no_image" and "no image under 'image'" in p.error
        else:
            assert p.error is None and p.score == pytest.approx(i / 1000) and p.model_version == "v-test"
    batches = [e[3] for e in recorder.of("infer")]
    # full batches of ready images in task order (failures do not shrink a batch), the last one partial
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    assert [p for b in batches for p in b] == [f"/images/img-{i}.png" for i in range(40) if i not in (3, 5, 17)]
    assert set(timings) == {"fetch", "infer", "serialize"}


def test_the_next_batch_is_fetched_while_one_is_predicted(recorder):
    fetcher = AheadFetcher(recorder, workers=4)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    pipeline.predict_tasks(tasks_for(32), SPEC, Model(), fetcher, threshold=0.5, batch=8, timings=timings)
    wall = time.perf_counter() - started
    infers, fetches = recorder.of("infer"), recorder.of("fetch")
    assert len(infers) == 4 and len(fetches) == 32
    first_infer = infers[0]
    during = [f for f in fetches if f[1] < first_infer[2] and f[2] > first_infer[1]]
    assert during, "no image was being fetched while the first batch was predicted"
    # inference never waited for all images: the last fetch ended after the first inference began
    assert max(f[2] for f in fetches) > first_infer[1]
    # Server-Timing's split adds up to the call, and fetch is only the wait inference did not hide
    assert sum(timings.values()) == pytest.approx(wall, rel=0.1, abs=0.02)
    serial_fetch = 32 * FETCH_S / 4
    assert timings["fetch"] < serial_fetch
    assert fetcher.windows == [16]  # two batches ahead


def test_fetching_runs_at_most_window_images_ahead():
    started: list[str] = []
    lock = threading.Lock()

    def one(url):
        with lock:
            started.append(url)
        return Path(url)

    urls = [f"u{i}" for i in range(50)]
    with Prefetch(one, urls + urls[:5], workers=3, window=6) as ahead:
        time.sleep(0.1)
        assert len(started) == 6  # nothing asked yet: only the window
        assert ahead.result(9) == Path("u9")
        time.sleep(0.1)
        assert len(started) == 16  # through u9, plus six more
        assert ahead.result(52) == Path("u2")  # a duplicate URL: its first fetch, no new one
        assert len(started) == 16
    assert len(set(started)) == len(started)  # each URL fetched once


def test_an_inference_failure_stops_the_fetches_not_yet_started(monkeypatch, recorder):
    fetcher = AheadFetcher(recorder, workers=2)

    def broken(*args, **kwargs):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(pipeline, "predict_images", broken)
    with pytest.raises(RuntimeError, match="the model broke"):
        pipeline.predict_tasks(tasks_for(200), SPEC, Model(), fetcher, threshold=0.5, batch=4)
    done = len(recorder.of("fetch"))
    time.sleep(3 * FETCH_S)
    assert len(recorder.of("fetch")) == done  # closed: nothing still running in the background
    assert done < 40  # the window (8) plus what was in flight, not the 200


def test_a_fetcher_without_fetch_ahead_fetches_first(recorder):
    fetcher = ManyFetcher()
    out = pipeline.predict_tasks(tasks_for(10, bad={2}), SPEC, Model(), fetcher, threshold=0.5, batch=4)
    assert fetcher.calls == [[f"{'bad' if i == 2 else 'img'}-{i}.png" for i in range(10)]]
    assert [p.error_kind for p in out] == [None, None, "no_image"] + [None] * 7
    assert [len(e[3]) for e in recorder.of("infer")] == [4, 4, 1]


def test_no_images_at_all(recorder):
    timings: dict[str, float] = {}
    out = pipeline.predict_tasks(tasks_for(3, missing={0, 1, 2}), SPEC, Model(), AheadFetcher(recorder),
                                 threshold=0.5, timings=timings)
    assert [p.error_kind for p in out] == ["no_image"] * 3
    assert recorder.of("infer") == [] and recorder.of("fetch") == [] and set(timings) == {"fetch"}
    assert pipeline.predict_tasks([], SPEC, Model(), AheadFetcher(recorder), threshold=0.5) == []
