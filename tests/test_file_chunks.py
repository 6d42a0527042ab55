"""workflows.file_chunks: what a prediction worker accepts for a chunk of FiftyOne image files (pure checks;
tests/test_fiftyone.py runs the chunks on a real Celery worker and compares them with predictions made here)."""

from __future__ import annotations

import json

import pytest

from labelloop.workflows.file_chunks import MAX_CHUNK, FilesContext, checked_paths

pytestmark = pytest.mark.unit


def test_a_context_survives_the_trip_to_a_worker_and_bad_values_are_refused():
    context = FilesContext("/models/p1/p1-v2/weights.pt", "p1-v2", "<View/>", 0.25, 16)
    assert FilesContext.from_json(json.loads(json.dumps(context.to_json()))) == context
    embed = FilesContext("/models/w.pt", "p1-v2", "", 0.0, 16, "embed")
    assert FilesContext.from_json(json.loads(json.dumps(embed.to_json()))) == embed
    for bad in ({"threshold": 1.5}, {"threshold": -0.1}, {"batch": 0}, {"batch": 10_000}, {"work": "train"}):
        with pytest.raises(ValueError):
            FilesContext.from_json({**context.to_json(), **bad})
    with pytest.raises(KeyError):
        FilesContext.from_json({"version": "p1-v2"})


def test_a_chunk_is_a_bounded_list_of_absolute_paths():
    assert [str(p) for p in checked_paths(["/data/a.png", "/data/b c.jpg"])] == ["/data/a.png", "/data/b c.jpg"]
    for bad in (["relative/a.png"], ["/data/a\x00.png"], [3], ["/" + "a" * 5000], "/data/a.png",
                ["/data/a.png"] * (MAX_CHUNK + 1)):
        with pytest.raises(ValueError):
            checked_paths(bad)
