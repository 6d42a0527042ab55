"""A prediction job at any size (issue 13): the project read page by page, the backlog cut into chunks that any
prediction worker takes (work-stealing through Redis), a failed chunk retried alone, a dead worker's chunk taken
back, a second delivery keeping the chunks already done.

The chunk logic runs on a real Redis with the chunk's work replaced by a recorder (what a chunk does is the
engine's ``predict_chunk``, run for real by the loop tests' Celery workers); the read runs against a real
Label Studio 1.23.2 with pages of three tasks.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest


class Recorder:
    """Stands in for ``predict_chunk``: records who ran which chunk, fails chosen chunks a number of times."""

    def __init__(self, fail: dict[int, int] | None = None, pause: float = 0.0):
        self.calls: list[tuple[str, int]] = []
        self.fail = dict(fail or {})
        self.pause = pause
        self.lock = threading.Lock()

    def __call__(self, context, tasks, client=None, fetcher=None, env=None):
        first = tasks[0]["id"]
        with self.lock:
            self.calls.append((threading.current_thread().name, first))
            if self.fail.get(first, 0) > 0:
                self.fail[first] -= 1
                raise RuntimeError(f"image server hiccup at task {first}")
        time.sleep(self.pause)
        return {"pushed": {str(t["id"]): [0.5, "star", []] for t in tasks}, "errors": 0}


@pytest.fixture
def shards(redis_server, monkeypatch):
    from labelloop.tasks import sharding
    from labelloop.tasks.jobstore import JobStore
    from labelloop.workflows import backlog

    monkeypatch.setattr(sharding, "_clients", lambda: (contextlib.nullcontext(), contextlib.nullcontext()))
    store = JobStore()

    def install(recorder: Recorder):
        monkeypatch.setattr(backlog, "predict_chunk", recorder)
        return recorder

    context = backlog.ChunkContext("7", "p7-v1", "/models/p7-v1/weights.pt", "<View/>")
    return sharding, store, install, context


def chunks_of(n_tasks: int, size: int = 10) -> list[list[dict]]:
    from labelloop.workflows.backlog import chunked

    return chunked([{"id": i, "data": {"image": f"/x/{i}.png"}} for i in range(n_tasks)], size)


def test_two_workers_share_the_chunks_and_a_failed_chunk_is_retried_alone(shards):
    """The job's worker and a helper (another worker) both take chunks; the chunk that fails once is run again,
    alone; every chunk's result comes back in order with who did it; progress reaches 1."""
    sharding, store, install, context = shards
    recorder = install(Recorder(fail={30: 1}, pause=0.05))
    chunks = chunks_of(100)
    job = f"job-{time.time_ns()}"
    seen: list[float] = []

    def helper():  # what labelloop.predict_chunks does on another worker, once the job has queued the chunks
        keys = sharding.ShardKeys.of(job)
        deadline = time.time() + 10
        while not store.r.exists(keys.context) and time.time() < deadline:
            time.sleep(0.01)
        while (sharding._take_and_run(store, keys, context, None, None, "worker-b")
               or store.r.exists(keys.producing)):  # chunks still coming: wait for them, as predict_chunks does
            time.sleep(0.001)

    thread = threading.Thread(target=helper, name="worker-b")
    thread.start()
    out = list(sharding.run_on_workers(job, "worker-a", helpers=0, store=store)(context, iter(chunks),
                                                                               lambda f, m: seen.append(f)))
    thread.join(timeout=30)
    assert [sorted(int(k) for k in o["pushed"]) for o in out] == [[t["id"] for t in c] for c in chunks]
    workers = {o["worker"] for o in out}
    assert workers == {"worker-a", "worker-b"}, out
    runs = [first for _, first in recorder.calls]
    assert runs.count(30) == 2 and all(runs.count(c[0]["id"]) == 1 for c in chunks if c[0]["id"] != 30)
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert not store.r.exists(sharding.ShardKeys.of(job).todo)


def test_a_chunk_that_keeps_failing_counts_its_tasks_as_errors_and_the_job_goes_on(shards):
    sharding, store, install, context = shards
    install(Recorder(fail={10: 99}))
    out = list(sharding.run_on_workers(f"job-{time.time_ns()}", "a", helpers=0, store=store)(
        context, chunks_of(30), lambda f, m: None))
    assert out[1]["errors"] == 10 and out[1]["pushed"] == {} and "3 attempts" in out[1]["failed"]
    assert "image server hiccup at task 10" in out[1]["failed"]
    assert len(out[0]["pushed"]) == len(out[2]["pushed"]) == 10


def test_a_dead_workers_chunk_is_taken_back_and_a_second_delivery_starts_afresh(shards):
    """A second delivery (the job's worker died) waits for the chunk a helper still runs, then runs the chunks its
    own read made — whatever the first delivery left in the shard (its chunks were cut from another read: the
    tasks it pushed hold this version's prediction now, so a new read leaves them out) — and nothing else."""
    sharding, store, install, context = shards
    recorder = install(Recorder())
    job = f"job-{time.time_ns()}"
    keys = sharding.ShardKeys.of(job)
    # the first delivery finished chunks 0 and 2, then its worker died holding chunk 1 (lease long gone) while a
    # helper on another worker still runs chunk 4 (its lease is live)
    store.r.hset(keys.results, mapping={"0": '{"pushed": {"0": [0.1, "star"]}, "errors": 0, "worker": "dead"}',
                                        "2": '{"pushed": {"20": [0.2, "star"]}, "errors": 0, "worker": "dead"}',
                                        "7": '{"pushed": {"70": [0.2, "star"]}, "errors": 0, "worker": "dead"}'})
    store.r.hset(keys.leases, mapping={"1": time.time() - 1, "4": time.time() + 60})
    helper_done = threading.Event()

    def live_helper():
        time.sleep(0.5)
        store.r.hset(keys.results, "4", '{"pushed": {"40": [0.3, "star"]}, "errors": 0, "worker": "helper"}')
        store.r.hdel(keys.leases, "4")
        helper_done.set()

    threading.Thread(target=live_helper).start()
    reread = chunks_of(30, size=10)  # what the second read finds left: other tasks, other chunk boundaries

    def chunks():
        assert helper_done.is_set(), "the second delivery read the project before the live chunk was done"
        yield from reread

    out = list(sharding.run_on_workers(job, "again", helpers=0, store=store)(context, chunks(), lambda f, m: None))
    assert sorted(first for _, first in recorder.calls) == [0, 10, 20]  # its own chunks, each once
    assert [o["worker"] for o in out] == ["again"] * 3  # none of the first delivery's results taken for its own
    assert [sorted(int(k) for k in o["pushed"]) for o in out] == [[t["id"] for t in c] for c in reread]
    assert all(store.r.ttl(key) > 0 for key in (keys.results, keys.chunks, keys.context))  # all expire with the job
    # the lease check on its own: an expired lease goes back on the list, a live one stays
    store.r.hset(keys.leases, mapping={"5": time.time() - 1, "6": time.time() + 60})
    assert sharding._requeue_expired(store, keys) == 1 and store.r.lrange(keys.todo, 0, -1) == ["5"]


def test_helpers_give_up_when_the_job_stops_reading(shards, monkeypatch):
    """The job's "still reading" mark is a heartbeat: a helper whose job died (no chunk for PRODUCING_TTL) stops
    waiting and frees its worker."""
    sharding, store, install, context = shards
    install(Recorder())
    monkeypatch.setattr(sharding, "PRODUCING_TTL", 1)
    job = f"job-{time.time_ns()}"
    keys = sharding.ShardKeys.of(job)
    store.r.set(keys.context, __import__("json").dumps(context.to_json()))
    store.r.set(keys.producing, 1, ex=1)  # the job set it, then died
    started = time.time()
    assert sharding.predict_chunks.run(job) == {"took": 0, "worker": sharding.predict_chunks.request.hostname
                                                or __import__("socket").gethostname()}
    assert time.time() - started < 5


def test_the_project_is_read_page_by_page_with_only_what_the_job_needs(ls_api, monkeypatch):
    """Against a real Label Studio with pages of 3: the unlabeled tasks without this version's prediction come in
    chunks (a cancelled annotation does not count), compact; this version's predictions are picked out of tasks
    that hold several versions, their scores into the score book (their result only where rough labels need it);
    the labeled ones come with their truth; the drift check's newest incoming tasks are kept, no more."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.dev.shapes import label_config
    from labelloop.workflows import backlog

    monkeypatch.setattr(backlog, "PAGE", 3)
    config = label_config("classification")
    project = ls_api.create_project("backlog paging", config)["id"]
    ls_api.request("POST", f"/api/projects/{project}/import",
                   json=[{"data": {"image": f"/data/upload/9/{i}.png", "n": i, **({"contains": "star"} if i == 4 else {})}}
                         for i in range(8)])
    ids = [t["id"] for t in ls_api.iter_tasks(project)]
    assert len(ids) == 8
    choice = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["star"]}}]
    for task_id in ids[:2]:
        ls_api.annotate(task_id, choice)
    ls_api.request("POST", f"/api/tasks/{ids[2]}/annotations", json={"result": [], "was_cancelled": True})
    ls_api.import_predictions(project, [
        {"task": ids[3], "result": choice, "score": 0.25, "model_version": "p9-v1"},
        {"task": ids[4], "result": [], "score": 0.5, "model_version": "p9-v2"},
        {"task": ids[4], "result": choice, "score": 0.75, "model_version": "p9-v1"},
        {"task": ids[5], "result": [], "score": 0.5, "model_version": "p9-v12"},
        {"task": ids[0], "result": [], "score": 0.5, "model_version": "p9-v1"},  # labeled: not a backlog task
    ])
    scan = backlog.BacklogScan(ls_api, project, parse_label_config(config), "p9-v1",
                               incoming=lambda task: task["data"]["n"] >= 5, incoming_keep=2)
    chunks = list(scan.chunks(size=2))
    assert [[t["id"] for t in c] for c in chunks] == [[ids[2], ids[5]], [ids[6], ids[7]]]  # held ones not again
    assert set(chunks[0][0]) == {"id", "data", "meta", "created_at"} and chunks[0][1]["data"]["n"] == 5
    assert (scan.unlabeled, scan.held) == (6, 2)
    assert dict(zip(scan.book.ids, scan.book.scores)) == {ids[3]: 0.25, ids[4]: 0.75}
    assert {scan.book.names[i] for i in scan.book.labels} == {"star"}
    assert list(scan.rough) == [ids[4]] and scan.held_results[ids[4]][0]["value"]["choices"] == ["star"]
    assert [t["id"] for t in scan.incoming_tasks()] == [ids[6], ids[7]]  # the newest two of ids 5-7
    assert scan.labeled == [] and scan.labeled_ids == set(ids[:2])
    scan.read_labeled()
    assert [(t["id"], truth.label) for t, truth in scan.labeled] == [(ids[0], "star"), (ids[1], "star")]
    whole = backlog.read_for_prediction(ls_api, project, parse_label_config(config), "p9-v1")
    assert whole.unlabeled == 6 and len(whole.labeled) == 2

    # what out-of-sample folds read (the labeled tasks, in full) and what the warm start reads (every image)
    labeled = ls_api.load_labeled(project)
    assert [t["id"] for t in labeled.tasks] == ids[:2] and labeled.spec.from_name == "label"
    assert all(t["annotations"] for t in labeled.tasks)
    images = ls_api.image_tasks(project)
    assert [t["id"] for t in images] == ids and images[5] == {"id": ids[5], "data": {"image": "/data/upload/9/5.png", "n": 5}}


def test_the_scores_of_human_labels_are_chunks_of_their_own_under_the_same_job(shards, monkeypatch):
    """After its predictions a job scores its human labels in chunks too: they run through ``score_chunk`` (not
    ``predict_chunk``), under keys of their own, so the predictions' results (kept for a second delivery) are
    not taken for the scores', and a helper queued for them is told which."""
    import dataclasses
    import json

    from labelloop.workflows import backlog

    sharding, store, install, context = shards
    install(Recorder())
    scored: list[int] = []

    def fake_score(ctx, items, env=None, client=None, fetcher=None):
        assert ctx.work == backlog.SCORE and all("truth" in item for item in items)
        scored.extend(item["id"] for item in items)
        return {"scores": {str(item["id"]): 0.1 * item["id"] for item in items}, "pushed": {}, "errors": 0}

    monkeypatch.setattr(backlog, "score_chunk", fake_score)
    queued: list[list] = []
    monkeypatch.setattr(sharding.predict_chunks, "apply_async", lambda args, **kw: queued.append(args))
    job = f"job-{time.time_ns()}"
    run = sharding.run_on_workers(job, "a", helpers=4, store=store)
    predicted = list(run(context, chunks_of(20), lambda f, m: None))
    items = [{"id": 100 + i, "data": {}, "truth": {"task_id": 100 + i, "annotation": "a", "label": "star"}}
             for i in range(25)]
    out = list(run(dataclasses.replace(context, work=backlog.SCORE), backlog.chunked(items, 10), lambda f, m: None))
    assert sum(len(o["pushed"]) for o in predicted) == 20
    assert sorted(scored) == list(range(100, 125)) and [len(o["scores"]) for o in out] == [10, 10, 5]
    assert queued[0] == [job] and queued[-1] == [f"{job}:score"]
    assert store.r.hlen(sharding.ShardKeys.of(job).results) == 2  # the predictions' results, untouched
    # a worker on another machine rebuilds the context from Redis: the work survives the trip
    raw = store.r.get(sharding.ShardKeys.of(f"{job}:score").context)
    assert backlog.ChunkContext.from_json(json.loads(raw)).work == backlog.SCORE
    with pytest.raises(ValueError, match="unknown chunk work"):
        backlog.ChunkContext.from_json({**context.to_json(), "work": "rm -rf"})


def test_helpers_take_chunks_while_the_job_still_reads(shards):
    """Chunks go on the list as the read makes them: a helper predicts the first ones before the job has read the
    project to its end, waits (not leaves) while more are coming, and every chunk is done once, in order."""
    sharding, store, install, context = shards
    recorder = install(Recorder())
    job = f"job-{time.time_ns()}"
    keys = sharding.ShardKeys.of(job)
    read_done = threading.Event()
    before_end: list[int] = []

    def slow_read():  # the job's paged read: a chunk every 0.1 s
        for chunk in chunks_of(50):
            yield chunk
            time.sleep(0.1)
        read_done.set()

    def helper():
        deadline = time.time() + 10
        while not store.r.exists(keys.producing) and time.time() < deadline:
            time.sleep(0.005)
        while True:
            calls = len(recorder.calls)
            if sharding._take_and_run(store, keys, context, None, None, "worker-b"):
                if not read_done.is_set() and len(recorder.calls) > calls:
                    before_end.append(recorder.calls[-1][1])
            elif store.r.exists(keys.producing):
                time.sleep(0.005)
            else:
                break

    thread = threading.Thread(target=helper, name="worker-b")
    thread.start()
    out = list(sharding.run_on_workers(job, "worker-a", helpers=0, store=store)(context, slow_read(), lambda f, m: None))
    thread.join(timeout=30)
    assert before_end and before_end[0] == 0, before_end  # the helper started on chunk 0 during the read
    assert [sorted(int(k) for k in o["pushed"]) for o in out] == [[t["id"] for t in c] for c in chunks_of(50)]
    assert sorted(first for _, first in recorder.calls) == [0, 10, 20, 30, 40]  # each chunk once
    assert not store.r.exists(keys.producing) and not store.r.exists(keys.todo)
