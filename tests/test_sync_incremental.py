"""The FiftyOne sync reads only what changed, page by page, and never loses the analyst's work (issue 13).

A real Label Studio project and a real FiftyOne dataset: the first sync reads the labeled tasks in one paged
pass, later syncs read by id only the tasks whose ``updated_at`` moved; a changed, a deleted and a new
annotation, a deleted task and a new one each land where they should.
"""

from __future__ import annotations

import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="red"/><Choice value="blue"/></Choices></View>')


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


class CountingClient:
    """The real client, counting the annotation reads (tasks read in full by id, or pages of every labeled task)."""

    def __init__(self, client):
        self.client, self.by_id, self.full_pages = client, 0, 0

    def select_tasks(self, project_id, task_ids, full=False):
        task_ids = list(task_ids)
        self.by_id += len(task_ids) if full else 0
        return self.client.select_tasks(project_id, task_ids, full=full)

    def iter_tasks(self, project_id, full=False, **options):
        self.full_pages += full
        return self.client.iter_tasks(project_id, full=full, **options)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_sync_reads_only_changed_tasks_and_keeps_the_analysts_work(fo, ls_api, label_studio, tmp_path, monkeypatch):
    from labelloop.config import settings
    from labelloop.fo import sync
    from labelloop.labelstudio.client import StudioClient

    monkeypatch.setenv("LABELLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.info["token"])
    env = settings()
    paths = []
    for k in range(10):
        paths.append(tmp_path / f"img{k}.png")
        Image.new("RGB", (24, 24), (20 * k, 100, 255 - 20 * k)).save(paths[-1])
    project = ls_api.create_project("incremental sync", CONFIG)["id"]
    tasks = ls_api.upload_images(project, paths[:8])
    annotations = {t["id"]: ls_api.annotate(t["id"], choice("red" if k % 2 else "blue")) for k, t in enumerate(tasks[:6])}
    name = f"incremental-{project}"

    with StudioClient.from_settings(env) as real:
        client = CountingClient(real)
        monkeypatch.setattr(sync, "READ_ONE_BY_ONE", 2)  # 6 labeled tasks: the first sync takes the paged pass
        first = sync.sync_project(project, name, predict=False, env=env, client=client)
        assert (first.added, first.updated_ground_truth, first.marked_deleted) == (8, 0, 0)
        assert client.full_pages == 1 and client.by_id == 0
        dataset = fo.load_dataset(name)
        truth = dict(zip(*dataset.values(["ls_task_id", "ground_truth.label"])))
        assert truth == {t["id"]: ("red" if k % 2 else "blue") if k < 6 else None for k, t in enumerate(tasks)}

        # the analyst's work on a sample whose annotation will change, and on one whose task will go
        for task_id in (tasks[0]["id"], tasks[6]["id"]):
            sample = dataset.match({"ls_task_id": task_id}).first()
            sample["my_note"] = "keep me"
            sample.tags.append("mine")
            sample.save()
        # in Label Studio: one annotation changed, one deleted, one unlabeled task annotated, one task deleted
        # (not the last: SQLite would give its id to the next task), two new ones, one task's image replaced
        ls_api.request("PATCH", f"/api/annotations/{annotations[tasks[0]['id']]['id']}", json={"result": choice("red")})
        ls_api.request("DELETE", f"/api/annotations/{annotations[tasks[1]['id']]['id']}")
        ls_api.annotate(tasks[7]["id"], choice("red"))
        ls_api.request("DELETE", f"/api/tasks/{tasks[6]['id']}")
        old = {t["id"] for t in tasks}
        added = [t for t in ls_api.upload_images(project, paths[8:]) if t["id"] not in old]  # it lists every task
        ls_api.annotate(added[0]["id"], choice("blue"))
        ls_api.request("PATCH", f"/api/tasks/{tasks[5]['id']}", json={"data": added[1]["data"]})
        before = dataset.match({"ls_task_id": tasks[5]["id"]}).first().filepath

        monkeypatch.setattr(sync, "READ_ONE_BY_ONE", 200)  # a few changes: read one by one
        client.by_id = client.full_pages = 0
        second = sync.sync_project(project, name, predict=False, env=env, client=client)
        assert (second.added, second.updated_ground_truth, second.marked_deleted, second.images_changed) == (2, 3, 1, 1)
        # the changed annotation, the newly annotated task, the new labeled one, the labeled task with a new image
        assert client.full_pages == 0 and client.by_id == 4
        truth = dict(zip(*dataset.values(["ls_task_id", "ground_truth.label"])))
        assert truth[tasks[0]["id"]] == "red" and truth[tasks[1]["id"]] is None and truth[tasks[7]["id"]] == "red"
        assert truth[added[0]["id"]] == "blue" and truth[added[1]["id"]] is None
        for task_id in (tasks[0]["id"], tasks[6]["id"]):
            sample = dataset.match({"ls_task_id": task_id}).first()
            assert sample["my_note"] == "keep me" and "mine" in sample.tags
        gone = dataset.match({"ls_task_id": tasks[6]["id"]}).first()
        assert sync.DELETED_TAG in gone.tags  # tagged, never removed
        replaced = dataset.match({"ls_task_id": tasks[5]["id"]}).first()
        assert sync.IMAGE_CHANGED_TAG in replaced.tags and replaced.filepath != before
        assert replaced.filepath == dataset.match({"ls_task_id": added[1]["id"]}).first().filepath  # same bytes
        assert replaced.ground_truth.label == "red"  # its annotation stays the task's
        assert len(dataset) == 10

        # nothing changed: no annotation read, nothing written
        client.by_id = client.full_pages = 0
        third = sync.sync_project(project, name, predict=False, env=env, client=client)
        assert (third.added, third.updated_ground_truth, third.marked_deleted) == (0, 0, 0)
        assert client.full_pages == 0 and client.by_id == 0

        # a dataset synced before ls_updated_at existed: every labeled task is read once, nothing rewritten
        monkeypatch.setattr(sync, "READ_ONE_BY_ONE", 2)
        dataset.set_values("ls_updated_at", [None] * len(dataset))
        client.by_id = client.full_pages = 0
        legacy = sync.sync_project(project, name, predict=False, env=env, client=client)
        assert legacy.updated_ground_truth == 0 and client.full_pages == 1
        assert None not in dataset.match_tags(sync.DELETED_TAG, bool=False).values("ls_updated_at")

        # a task whose new image cannot be fetched keeps its old one, and is tried again at the next sync
        kept = dataset.match({"ls_task_id": tasks[4]["id"]}).first().filepath
        ls_api.request("PATCH", f"/api/tasks/{tasks[4]['id']}", json={"data": {"image": f"/data/upload/{project}/gone.png"}})
        for attempt in range(2):
            failed = sync.sync_project(project, name, predict=False, env=env, client=client)
            assert failed.images_changed == 0 and failed.missing_images == 1, attempt
            assert f"task {tasks[4]['id']}: its new image was not fetched" in failed.errors[0]
            assert dataset.match({"ls_task_id": tasks[4]["id"]}).first().filepath == kept


def test_the_dataset_is_walked_in_task_order_beside_label_studio(fo, monkeypatch):
    """The sync's walk over the dataset (pages of 2 here): a task Label Studio still has is taken, the samples of
    lower ids it skipped are its deleted tasks, samples added during the walk (at once here: the sync adds them a
    batch later, lower still) are never taken for known ones, and a sample without a task id is left alone."""
    from labelloop.fo import sync

    monkeypatch.setattr(sync, "KNOWN_PAGE", 2)
    dataset = fo.Dataset("walk-in-order", overwrite=True)
    dataset.add_sample_field("ls_task_id", fo.IntField)
    dataset.create_index("ls_task_id", unique=True)
    for name in ("ls_annotation", "ls_image_url", "ls_updated_at"):  # as the sync declares them
        dataset.add_sample_field(name, fo.StringField)

    def add(task_id):
        return dataset.add_sample(fo.Sample(filepath=f"/images/{task_id}.png", ls_task_id=task_id,
                                            ls_updated_at=f"u{task_id}"))

    ids = {t: add(t) for t in (2, 5, 7, 9, 12)}
    dataset.add_sample(fo.Sample(filepath="/images/analyst-added.png"))  # no ls_task_id: not a task's sample
    walk, gone, taken = sync._KnownInOrder(dataset), [], {}
    for task_id in (1, 5, 6, 9, 13):  # Label Studio's tasks now: 1, 6, 13 new; 2, 7, 12 deleted
        gone += walk.passed(task_id)
        mine = walk.take(task_id)
        if mine is None:
            add(task_id)  # what the sync's batch does
        else:
            taken[task_id] = mine
    gone += walk.rest()
    assert sorted(gone) == sorted(ids[t] for t in (2, 7, 12))
    assert {t: k.sample_id for t, k in taken.items()} == {5: ids[5], 9: ids[9]}
    assert taken[9].updated_at == "u9"
