"""Automatic training settings and architecture: chosen from the data, overridable by environment."""

import pytest

from labelloop.config import settings
from labelloop.core import recipe
from labelloop.core.training import choose_settings

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`


@pytest.mark.parametrize("n_train", range(2, 120))
def test_batch_never_leaves_a_last_batch_of_one(n_train):
    chosen = choose_settings(n_train, [160], "detect", settings())
    assert 2 <= chosen.batch <= 16 and n_train % chosen.batch != 1


def test_settings_follow_the_data():
    small = choose_settings(24, [150, 160, 170], "classify", settings())
    large = choose_settings(60_000, [640, 900], "detect", settings())
    assert small.imgsz == 160 and large.imgsz == 640  # median side, multiple of 32, capped at 640
    assert small.epochs == recipe.MAX_EPOCHS and large.epochs == recipe.MIN_EPOCHS  # by optimizer steps
    assert small.patience == small.epochs  # no early stop while small data is still near chance
    assert recipe.SMALL_DATA_CLASSIFY_ARGS.items() <= small.extra.items() and "mosaic" not in large.extra


def test_epochs_follow_optimizer_steps_not_images():
    def steps(n_train, batch=16):
        return recipe.epochs_for(n_train, batch) * -(-n_train // batch)

    # a few dozen labels get the floor of updates (many passes over few images) ...
    for n_train in (96, 120):
        assert recipe.MIN_STEPS <= steps(n_train) < recipe.MIN_STEPS + 2 * -(-n_train // 16)
    # ... more labels get more updates, in proportion, up to the ceiling
    assert steps(320) >= recipe.STEPS_PER_IMAGE * 320 > recipe.MIN_STEPS
    assert steps(640) >= 2 * recipe.STEPS_PER_IMAGE * 320 - 16
    assert recipe.MAX_STEPS <= steps(5000) < recipe.MAX_STEPS + 2 * -(-5000 // 16)
    assert recipe.epochs_for(8, 8) == recipe.MAX_EPOCHS and recipe.epochs_for(100_000, 16) == recipe.MIN_EPOCHS


def test_small_images_get_the_small_architecture():
    assert recipe.model_config("classify", 64).endswith("labelloop-cls-small.yaml")
    assert recipe.model_config("classify", 224) == "yolov8n-cls.yaml"
    assert recipe.model_config("detect", 64) == "yolov8n.yaml"
    described = recipe.describe("classify", 64, 100, recipe.model_config("classify", 64))
    assert described["architecture"] == "labelloop-cls-small.yaml" and "stride-2" in described["architecture_reason"]


def test_small_architecture_builds_and_keeps_a_feature_map_at_64_px():
    import torch
    from ultralytics.nn.tasks import ClassificationModel

    model = ClassificationModel(recipe.model_config("classify", 64), nc=4, verbose=False)
    features = model.model[:-1](torch.zeros(1, 3, 64, 64))
    assert features.shape[-2:] == (4, 4)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_turns_and_shifts_keep_the_size_and_range():
    from PIL import Image

    augment = recipe.TurnsAndShifts(32)
    out = augment(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert tuple(out.shape) == (3, 32, 32) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_environment_overrides_win(monkeypatch):
    monkeypatch.setenv("LABELLOOP_EPOCHS", "7")
    monkeypatch.setenv("LABELLOOP_IMGSZ", "96")
    monkeypatch.setenv("LABELLOOP_TRAIN_ARGS", '{"lr0": 0.01}')
    chosen = choose_settings(50, [160], "detect", settings())
    assert (chosen.epochs, chosen.imgsz, chosen.extra["lr0"]) == (7, 96, 0.01)


def test_up_weighted_files_make_epochs_longer_not_the_training():
    # 320 images of which some are repeated to 640 files: the steps of 320 images, in fewer epochs
    plain, repeated = recipe.epochs_for(320, 16), recipe.epochs_for(640, 16, n_images=320)
    assert abs(repeated * 40 - plain * 20) <= 40 and repeated < plain
