"""Bulk writes of several fields at once (fo/writes.py) store exactly what FiftyOne's set_values stores,
on a real mongod; an undeclared field and FiftyOne internals that moved both fall back to set_values."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def _columns(fo, ids):
    return {
        "predictions": {i: fo.Classification(label=f"c{k % 3}", confidence=k / 10) for k, i in enumerate(ids)},
        "class_probs": {i: {"c0": 0.5, "c1": 0.25, "c2": 0.25} for i in ids},
        "ls_score": {i: k / 7 for k, i in enumerate(ids)},
        "prediction_version": {i: "p1-v2" for i in ids},
        "candidates": {i: fo.Detections(detections=[fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.2, 0.2],
                                                                  confidence=0.4, class_probs={"a": 0.4})])
                       for i in ids},
    }


def _plain(dataset, fields):
    """Every sample's fields as plain values, label ids left out (each write makes its own)."""
    def strip(value):
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("_id", "id")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return [{f: strip(sample[f]) for f in fields} for sample in dataset.iter_samples()]


def _dataset(fo, name, n=5):
    dataset = fo.Dataset(name, overwrite=True)
    dataset.add_samples([fo.Sample(filepath=f"/images/{k}.png", keep="mine") for k in range(n)], progress=False)
    return dataset


def test_combined_writes_store_what_set_values_stores(fo):
    from labelloop.fo.writes import write_columns

    public, combined = _dataset(fo, "writes-public"), _dataset(fo, "writes-combined")
    for name, values in _columns(fo, public.values("id")).items():
        public.set_values(name, values, key_field="id")
    columns = _columns(fo, combined.values("id"))
    write_columns(combined, {"ls_score": {combined.first().id: 0.0}})  # declares one field: the rest is new
    write_columns(combined, columns)  # first write of the others: declared by set_values
    write_columns(combined, columns)  # now every field is declared: the combined path
    fields = list(columns) + ["keep"]
    assert _plain(combined, fields) == _plain(public, fields)
    assert set(combined.values("keep")) == {"mine"}  # fields not written stay as they were


def test_a_sample_absent_from_a_column_keeps_that_field(fo):
    from labelloop.fo.writes import write_columns

    dataset = _dataset(fo, "writes-partial", n=3)
    ids = dataset.values("id")
    write_columns(dataset, {"ls_score": dict.fromkeys(ids, 1.0), "prediction_version": dict.fromkeys(ids, "v1")})
    write_columns(dataset, {"ls_score": {ids[0]: 0.5}, "prediction_version": {ids[1]: "v2"}})
    assert dataset.values("ls_score") == [0.5, 1.0, 1.0]
    assert dataset.values("prediction_version") == ["v1", "v2", "v1"]


def test_moved_fiftyone_internals_fall_back_to_set_values(fo, monkeypatch, caplog):
    from labelloop.fo import writes

    dataset = _dataset(fo, "writes-fallback", n=3)
    ids = dataset.values("id")
    writes.write_columns(dataset, {"ls_score": dict.fromkeys(ids, 1.0)})

    def moved(*args):  # what an upgrade that renamed a private function would raise
        raise ImportError("cannot import name '_serialize_value'")

    monkeypatch.setattr(writes, "_combined_write", moved)
    write_columns = writes.write_columns
    write_columns(dataset, {"ls_score": {ids[2]: 0.25}})
    assert dataset.values("ls_score") == [1.0, 1.0, 0.25]
    assert "field by field" in caplog.text


def test_a_label_in_its_stored_form_is_the_label_object(fo, monkeypatch):
    """``stored_classification`` (no FiftyOne object built) stores what a ``fo.Classification`` stores, on the bulk
    path and on the set_values fallback; the label reads back as a Classification with its own id."""
    from labelloop.fo import writes

    public, stored, fallback = (_dataset(fo, f"writes-stored-{k}", n=4) for k in ("public", "bulk", "fallback"))
    for name, dataset in (("public", public), ("bulk", stored), ("fallback", fallback)):
        ids = dataset.values("id")
        make = fo.Classification if name == "public" else writes.stored_classification
        values = {i: make(label=f"c{k % 2}", confidence=k / 4) for k, i in enumerate(ids)}
        if name == "public":
            dataset.set_values("predictions", values, key_field="id")
        elif name == "bulk":
            writes.write_columns(dataset, {"predictions": {ids[0]: fo.Classification(label="x")}})  # declared
            writes.write_columns(dataset, {"predictions": values})
        else:
            writes.write_columns(dataset, {"predictions": values})  # undeclared: set_values gets the object back
    assert _plain(stored, ["predictions"]) == _plain(public, ["predictions"]) == _plain(fallback, ["predictions"])
    first = stored.first().predictions
    assert isinstance(first, fo.Classification) and first.label == "c0" and first.id
    assert len(set(stored.values("predictions.id"))) == 4  # each label its own id
