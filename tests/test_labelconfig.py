"""Label config parsing and label mapping (pure logic, no server)."""

import pytest

from labelloop.core.labelconfig import LabelConfigError, parse_label_config, resolve_model_path

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`

IMG = '<Image name="image" value="$image"/>'


def config(body: str) -> str:
    return f"<View>{IMG}{body}</View>"


@pytest.mark.parametrize("tag,child,task_type,result_type", [
    ("Choices", "Choice", "classification", "choices"),
    ("RectangleLabels", "Label", "detection", "rectanglelabels"),
    ("PolygonLabels", "Label", "segmentation", "polygonlabels"),
])
def test_three_task_types(tag, child, task_type, result_type):
    spec = parse_label_config(config(f'<{tag} name="lbl" toName="image"><{child} value="cat"/><{child} value="Dog"/></{tag}>'))
    assert spec.task_type == task_type
    assert spec.result_type == result_type
    assert (spec.from_name, spec.to_name, spec.value_key) == ("lbl", "image", "image")
    assert spec.labels == ("cat", "Dog")


def test_label_map_precedence_predicted_values_then_exact_then_case_insensitive():
    spec = parse_label_config(config(
        '<RectangleLabels name="l" toName="image">'
        '<Label value="Vehicle" predicted_values="car,truck"/><Label value="person"/><Label value="Dog"/>'
        '</RectangleLabels>'))
    mapping = spec.label_map({0: "person", 1: "car", 2: "truck", 3: "dog", 4: "zebra"})
    assert mapping == {0: "person", 1: "Vehicle", 2: "Vehicle", 3: "Dog"}


def test_predicted_values_beat_an_exact_match():
    spec = parse_label_config(config(
        '<RectangleLabels name="l" toName="image"><Label value="cat"/><Label value="pet" predicted_values="cat"/>'
        '</RectangleLabels>'))
    assert spec.label_map(["cat"]) == {0: "pet"}


def test_unmappable_model_is_a_clear_error_naming_the_tag():
    spec = parse_label_config(config('<RectangleLabels name="boxes" toName="image"><Label value="a"/></RectangleLabels>'))
    with pytest.raises(LabelConfigError, match=r"RectangleLabels.*'boxes'.*predicted_values"):
        spec.require_label_map(["zebra", "giraffe"])


@pytest.mark.parametrize("cfg,pattern", [
    (config('<TextArea name="t" toName="image"/>'), r"no control the model can serve.*TextArea"),
    ("<View><Text name=\"txt\" value=\"$text\"/><Choices name=\"c\" toName=\"txt\"><Choice value=\"a\"/></Choices></View>",
     r"<Choices name=\"c\"> must point toName at an <Image>"),
    ("<View><Image", r"not valid XML"),
    ("", r"empty"),
    (config('<RectangleLabels name="l" toName="image" model_score_threshold="high"><Label value="a"/></RectangleLabels>'),
     r"model_score_threshold"),
    (config('<RectangleLabels name="r" toName="image"><Label value="a"/></RectangleLabels>'
            '<PolygonLabels name="p" toName="image"><Label value="a"/></PolygonLabels>'), r"model_skip"),
])
def test_unsupported_configs_are_errors_that_name_the_tag(cfg, pattern):
    with pytest.raises(LabelConfigError, match=pattern):
        parse_label_config(cfg)


def test_upstream_attributes_threshold_and_skip():
    spec = parse_label_config(config(
        '<RectangleLabels name="r" toName="image" model_score_threshold="0.3"><Label value="a"/></RectangleLabels>'
        '<PolygonLabels name="p" toName="image" model_skip="true"><Label value="a"/></PolygonLabels>'))
    assert spec.from_name == "r" and spec.score_threshold == pytest.approx(0.3)


def test_model_path_needs_the_flag_and_stays_under_model_root(tmp_path):
    (tmp_path / "mine.pt").write_bytes(b"x")
    spec = parse_label_config(config(
        '<RectangleLabels name="r" toName="image" model_path="mine.pt"><Label value="a"/></RectangleLabels>'))
    with pytest.raises(LabelConfigError, match="ALLOW_CUSTOM_MODEL_PATH"):
        resolve_model_path(spec, allow_custom=False, model_root=tmp_path)
    assert resolve_model_path(spec, allow_custom=True, model_root=tmp_path) == (tmp_path / "mine.pt").resolve()
    escaping = parse_label_config(config(
        '<RectangleLabels name="r" toName="image" model_path="../etc/passwd"><Label value="a"/></RectangleLabels>'))
    with pytest.raises(LabelConfigError, match="escapes MODEL_ROOT"):
        resolve_model_path(escaping, allow_custom=True, model_root=tmp_path)
