"""Automatic training settings: chosen from the data, overridable by environment."""

import pytest

from labelloop.config import settings
from labelloop.training import SMALL_DATA_CLASSIFY_ARGS, choose_settings


@pytest.mark.parametrize("n_train", range(2, 120))
def test_batch_never_leaves_a_last_batch_of_one(n_train):
    chosen = choose_settings(n_train, [160], "detect", settings())
    assert 2 <= chosen.batch <= 16 and n_train % chosen.batch != 1


def test_settings_follow_the_data():
    small = choose_settings(24, [150, 160, 170], "classify", settings())
    large = choose_settings(2000, [640, 900], "detect", settings())
    assert small.imgsz == 160 and large.imgsz == 640  # median side, multiple of 32, capped at 640
    assert small.epochs == 100 and large.epochs == 10  # more passes over little data
    assert small.patience == small.epochs  # no early stop while small data is still at chance
    assert SMALL_DATA_CLASSIFY_ARGS.items() <= small.extra.items() and "mosaic" not in large.extra


def test_environment_overrides_win(monkeypatch):
    monkeypatch.setenv("LABELLOOP_EPOCHS", "7")
    monkeypatch.setenv("LABELLOOP_IMGSZ", "96")
    monkeypatch.setenv("LABELLOOP_TRAIN_ARGS", '{"lr0": 0.01}')
    chosen = choose_settings(50, [160], "detect", settings())
    assert (chosen.epochs, chosen.imgsz, chosen.extra["lr0"]) == (7, 96, 0.01)
