"""Outside names never become paths or pickles: labels in dataset folders, version names in the
registry and the FiftyOne operators, foreign weights files, and the FiftyOne dataset's images."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
from PIL import Image

from labelloop.core.datasets import build_dataset
from labelloop.core.labelconfig import ControlSpec, LabelConfigError, parse_label_config
from labelloop.core.registry import Registry, RegistryError
from labelloop.labelstudio.results import labeled_images

PLUGIN = "@labelloop/labelloop"


def choices_config(labels) -> str:
    choices = "".join(f"<Choice value={quoteattr(label)}/>" for label in labels)
    return f'<View><Image name="image" value="$image"/><Choices name="label" toName="image">{choices}</Choices></View>'


def choice_tasks(labels, per_label: int, images: Path) -> tuple[list[dict], dict[int, Path]]:
    """Tasks with one classification each; every label gets images of its own colour."""
    tasks, paths = [], {}
    images.mkdir(parents=True, exist_ok=True)
    for k, label in enumerate(labels):
        for j in range(per_label):
            task_id = 1 + k * per_label + j
            path = images / f"{task_id}.png"
            Image.new("RGB", (32, 32), ((60 * k) % 256, (90 * j) % 256, 200 - 40 * k % 200)).save(path)
            paths[task_id] = path
            result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
            tasks.append({"id": task_id, "data": {"image": str(path)},
                          "annotations": [{"id": task_id, "result": result}]})
    return tasks, paths


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# -- labels → dataset paths -------------------------------------------------------------------------

def test_hostile_labels_build_a_dataset_only_inside_its_root(tmp_path):
    absolute = str(tmp_path / "absolute-target")  # an absolute label, aimed where the test can look
    labels = ["../../escaped", absolute, "cat/dog", "..", "back\\slash", "x" * 300, "ok"]
    spec = parse_label_config(choices_config(labels))
    assert list(spec.labels) == labels  # Label Studio accepts every one of these as a label value
    tasks, paths = choice_tasks(labels, 3, tmp_path / "src")
    out = tmp_path / "work" / "data"
    out.parent.mkdir()
    before = files_under(tmp_path)

    info = build_dataset(labeled_images(tasks, spec), spec, paths, out)

    created = files_under(tmp_path) - before
    outside = sorted(str(p) for p in created if out != p and out not in p.parents)
    assert not outside, f"dataset files written outside {out}: {outside}"
    assert not Path(absolute).exists()
    # the folders are class indices; the real label text is what ultralytics will read as class names
    from ultralytics.utils import YAML

    from labelloop.core.datasets import INDEXED_NAMES_FILE

    names_file = out / INDEXED_NAMES_FILE

    assert YAML.load(names_file)["names"] == dict(enumerate(labels))
    for split in ("train", "val"):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(str(i) for i in range(len(labels)))
    for index, label in enumerate(labels):
        placed = {int(p.stem) for split in ("train", "val") for p in info.class_dir(split, label).iterdir()}
        assert placed == {t["id"] for t in tasks if t["annotations"][0]["result"][0]["value"]["choices"] == [label]}
        assert info.class_dir("val", label) == out / "val" / str(index)

    # a NUL cannot be in an XML label config, but a spec built otherwise must not reach a path either
    nul_spec = ControlSpec("classification", "label", "image", "image", ("nul\x00byte", "ok"))
    nul_tasks, nul_paths = choice_tasks(nul_spec.labels, 3, tmp_path / "src-nul")
    nul_info = build_dataset(labeled_images(nul_tasks, nul_spec), nul_spec, nul_paths, tmp_path / "nul" / "data")
    assert nul_info.class_dirs == {"nul\x00byte": "0", "ok": "1"}

    # ordinary labels keep the layout training has always used: folders named by the labels
    plain = parse_label_config(choices_config(["circle", "square"]))
    plain_tasks, plain_paths = choice_tasks(plain.labels, 3, tmp_path / "src-plain")
    plain_info = build_dataset(labeled_images(plain_tasks, plain), plain, plain_paths, tmp_path / "plain" / "data")
    assert sorted(p.name for p in (plain_info.root / "train").iterdir()) == ["circle", "square"]
    assert not (plain_info.root / INDEXED_NAMES_FILE).exists()


def test_a_model_trained_on_hostile_labels_names_its_classes_by_the_real_labels(tmp_path):
    from labelloop.core import recipe
    from labelloop.core.predict import load_model
    from labelloop.core.training import TrainSettings, train

    labels = ["../../up", "a/b", "plain"]
    spec = parse_label_config(choices_config(labels))
    tasks, paths = choice_tasks(labels, 4, tmp_path / "src")
    info = build_dataset(labeled_images(tasks, spec), spec, paths, tmp_path / "data")
    settings = TrainSettings(epochs=1, imgsz=32, batch=info.counts["train"], patience=1, device="cpu")  # one batch
    weights = train(info, spec, recipe.model_config("classify", 32), settings, tmp_path / "run")

    model = load_model(weights, "hostile-labels")  # a checkpoint of our own training passes the pickle check
    assert [model.names[i] for i in sorted(model.names)] == labels
    assert spec.require_label_map(model.names) == dict(enumerate(labels))
    assert not (tmp_path / "up").exists() and not (tmp_path / "a").exists()


# -- version names --------------------------------------------------------------------------------------

def plant_manifest(directory: Path, project: str = "3") -> None:
    """A complete-looking version directory where a traversal would land, beside a project that has
    versions (``versions/..`` resolves only where ``versions/`` exists)."""
    import json

    (directory.parent / project / "versions").mkdir(parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({
        "version": "p3-v1", "project": project, "parent": None, "created_at": 0.0, "task": "classify",
        "task_type": "classification", "classes": ["a"]}))


@pytest.mark.parametrize("version", ["../../planted", "p3-v1/../../../planted", str(Path("/tmp")), "p3-v1\n",
                                     "", "..", "p3-v1/..", "p3-v"])
def test_registry_get_refuses_names_that_are_not_versions(tmp_path, version):
    registry = Registry(tmp_path / "models")
    plant_manifest(tmp_path / "models" / "projects" / "planted")
    with pytest.raises(RegistryError, match="not a labelloop version name"):
        registry.get("3", version)


def malicious_checkpoint(path: Path, marker: Path, **save_kwargs) -> Path:
    """A torch checkpoint whose unpickling runs a shell command that creates ``marker``."""
    import torch

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Payload()}, path, **save_kwargs)
    return path


def test_fiftyone_operator_refuses_a_traversing_version_before_anything_loads(fo, tmp_path, monkeypatch):
    from fiftyone.operators import execute_operator

    models = tmp_path / "models"
    monkeypatch.setenv("MODEL_DIR", str(models))
    marker = tmp_path / "pwned"
    planted = models / "projects" / "planted"  # where versions/../../planted lands for project 3
    plant_manifest(planted)
    malicious_checkpoint(planted / "weights.pt", marker)
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    dataset = fo.Dataset(f"safe-names-{os.getpid()}")
    dataset.info["labelloop"] = {"project": 3, "task_type": "classification",
                                 "label_config": choices_config(["a", "b"])}
    dataset.save()
    dataset.add_sample(fo.Sample(filepath=str(image), ground_truth=fo.Classification(label="a"), tuning_split="val"))

    from fiftyone.operators.executor import ExecutionError

    from labelloop.fo import analysis as fo_analysis

    try:  # the form refuses it (a validation error), or the operator answers with an error
        outcome = execute_operator(f"{PLUGIN}/evaluate_model", ctx={
            "dataset": dataset.name, "view": dataset.view(),
            "params": {"view_target": "CURRENT_VIEW", "version": "../../planted", "split": "val"}})
        message = str(outcome.error or (outcome.result or {}).get("error"))
    except ExecutionError as exc:
        message = str(exc)
    assert "not a labelloop version name" in message, message
    # the library behind the operator refuses it too (the CLI and Celery jobs call it directly)
    with pytest.raises(ValueError, match="not a labelloop version name"):
        fo_analysis.evaluate_model(dataset, "../../planted")
    with pytest.raises(ValueError, match="not a labelloop version name"):
        fo_analysis.compare_versions(dataset, "p3-v1", "../../planted")
    with pytest.raises(ValueError, match="belongs to project 4"):
        fo_analysis.evaluate_model(dataset, "p4-v1")
    assert not marker.exists(), "the planted checkpoint was unpickled"


# -- pickles ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("save_kwargs", [{}, {"pickle_protocol": 4}, {"_use_new_zipfile_serialization": False}],
                         ids=["zip", "zip-protocol-4", "legacy-format"])
def test_only_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch, save_kwargs):
    from labelloop.core.predict import load_model
    from labelloop.core.safe_load import UnsafeWeightsError

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "registry"))  # these files are not the registry's
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker, **save_kwargs)
    if save_kwargs.get("_use_new_zipfile_serialization") is None:
        assert zipfile.is_zipfile(evil) and any(n.endswith("/data.pkl") for n in zipfile.ZipFile(evil).namelist())

    with pytest.raises(UnsafeWeightsError, match=r"posix\.system|os\.system"):
        load_model(evil, "evil")
    assert not marker.exists(), "the checkpoint's code ran"
    assert isinstance(UnsafeWeightsError("x"), LabelConfigError)  # the service answers it as a 422

    # the same file through the doors a user has: a tag's model_path under MODEL_ROOT, LABELLOOP_BASE_MODEL
    root = tmp_path / "weights"
    root.mkdir()
    shutil.copy(evil, root / "user.pt")
    from labelloop.config import settings
    from labelloop.workflows.pipeline import resolve_model

    monkeypatch.setenv("ALLOW_CUSTOM_MODEL_PATH", "true")
    monkeypatch.setenv("MODEL_ROOT", str(root))
    spec = ControlSpec("classification", "label", "image", "image", ("a",), model_path="user.pt")
    with pytest.raises(UnsafeWeightsError):
        resolve_model(Registry(tmp_path / "registry"), None, spec, settings())
    monkeypatch.setenv("LABELLOOP_BASE_MODEL", str(evil))
    with pytest.raises(UnsafeWeightsError):
        resolve_model(Registry(tmp_path / "registry"), None, ControlSpec("classification", "label", "image", "image",
                                                                         ("a",)), settings())
    assert not marker.exists()

    # a real ultralytics checkpoint, saved the way ultralytics saves one, still loads
    from labelloop.core import recipe
    from labelloop.core.yolo_env import import_yolo

    real = tmp_path / "real.pt"
    import_yolo()(recipe.model_config("classify", 32), task="classify").save(real)
    model = load_model(real, "real")
    assert model.task == "classify" and model.names


def test_a_checkpoint_that_calls_a_model_class_is_refused(tmp_path, monkeypatch):
    """Layer classes may be restored (``__new__`` + state), never called: calling ClassificationModel(cfg)
    parses a model config, which is not what restoring weights does."""
    import torch
    from ultralytics.nn.tasks import ClassificationModel

    from labelloop.core import recipe
    from labelloop.core.predict import load_model
    from labelloop.core.safe_load import UnsafeWeightsError

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "registry"))

    class Built:
        def __reduce__(self):
            return ClassificationModel, (str(recipe.model_config("classify", 32)),)

    path = tmp_path / "built.pt"
    torch.save({"model": Built()}, path)
    with pytest.raises(UnsafeWeightsError, match="ClassificationModel"):
        load_model(path, "built")


# -- FiftyOne images outlive the media cache ----------------------------------------------------------------

@pytest.mark.e2e
def test_synced_images_stay_readable_after_the_media_cache_drops_them(fo, ls_api, label_studio, tmp_path,
                                                                      monkeypatch):
    from labelloop.config import settings
    from labelloop.fo.sync import sync_project

    home = tmp_path / "home"
    monkeypatch.setenv("LABELLOOP_HOME", str(home))
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.info["token"])
    env = settings()
    sources = []
    for k in range(3):
        sources.append(tmp_path / f"img{k}.png")
        Image.new("RGB", (40, 30), (80 * k, 20, 200)).save(sources[-1])
    project = ls_api.create_project("media ownership", choices_config(["a", "b"]))["id"]
    tasks = ls_api.upload_images(project, sources)
    ls_api.annotate(tasks[1]["id"], [{"from_name": "label", "to_name": "image", "type": "choices",
                                      "value": {"choices": ["b"]}}])
    name = f"media-owned-{project}"
    owned = home / "fiftyone-media" / str(project)  # the dataset's own folder, under the labelloop home

    report = sync_project(project, name, predict=False, env=env)
    assert report.added == 3 and not report.errors
    dataset = fo.load_dataset(name)
    cache = env.cache_dir / "media"
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert len(cached) == 3
    for path in cached:  # what the cache's LRU eviction does to a file
        path.unlink()
    for sample in dataset:
        with Image.open(sample.filepath) as img:
            img.load()
        assert Path(sample.filepath).parent == owned

    # a dataset synced before (filepath in the cache) is moved off it on the next sync, analyst's work kept
    sample = dataset.match({"ls_task_id": tasks[0]["id"]}).first()
    legacy = cache / "ab" / ("ab" + "0" * 62 + ".png")
    sample.filepath = str(legacy)
    sample["my_note"] = "keep me"
    sample.tags.append("mine")
    sample.save()
    report = sync_project(project, name, predict=False, env=env)
    assert report.added == 0 and not report.errors
    sample.reload()
    with Image.open(sample.filepath) as img:
        img.load()
    assert Path(sample.filepath).parent == owned
    assert sample["my_note"] == "keep me" and "mine" in sample.tags


def test_a_pickle_in_front_of_a_harmless_zip_is_read_as_torch_reads_it(tmp_path, monkeypatch):
    """torch.load decides "zip" by the first bytes; Python's zipfile by the end. A pickle followed by a
    harmless checkpoint is a legacy pickle to torch, so that is what must be checked."""
    import pickle

    import torch

    from labelloop.core.predict import load_model
    from labelloop.core.safe_load import UnsafeWeightsError

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "registry"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    harmless = tmp_path / "harmless.pt"
    torch.save({"model": None}, harmless)
    polyglot = tmp_path / "polyglot.pt"
    polyglot.write_bytes(pickle.dumps(Payload(), protocol=2) + harmless.read_bytes())
    assert zipfile.is_zipfile(polyglot)

    with pytest.raises(UnsafeWeightsError, match=r"posix\.system"):
        load_model(polyglot, "polyglot")
    assert not marker.exists(), "the leading pickle ran"


# -- settings reach the engine as passed ------------------------------------------------------------

def test_injected_settings_reach_the_training_and_not_the_environment(tmp_path, monkeypatch):
    """A workflow given a Settings uses it end to end (epochs, image size, batch, device), even when the
    environment says otherwise: the benches and the demo configure runs without touching os.environ."""
    import dataclasses

    from labelloop.config import settings
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    monkeypatch.setenv("LABELLOOP_EPOCHS", "7")  # what the process environment says; the injected one wins
    spec = parse_label_config(choices_config(["red", "blue"]))
    tasks, _ = choice_tasks(spec.labels, 5, tmp_path / "src")
    env = dataclasses.replace(settings(), epochs=1, imgsz=32, batch=4, device="cpu", warm_start_steps=0)
    outcome = train_new_version(Registry(tmp_path / "models"), 5, tasks, spec, LocalFileFetcher(), env=env)
    used = outcome.manifest.settings
    assert (used["epochs"], used["imgsz"], used["batch"], used["device"]) == (1, 32, 4, "cpu")
