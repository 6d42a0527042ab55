"""labelloop's FiftyOne operators: the analyst's face of the engine.

Each operator is a form plus a call into ``labelloop.fo.sync`` / ``labelloop.fo.analysis``; the
numbers come from the same engine that answers Label Studio. Every operator works on the current
view, can run delegated (``fiftyone delegated launch`` or a Celery worker) with progress, and says
plainly what is missing (no model yet, no ground truth, no embeddings).
"""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from labelloop.errors import LabelloopError
from labelloop.fo import analysis as fo_analysis
from labelloop.fo import sync as fo_sync

METHODS = ("least_confidence", "margin", "entropy")


def _progress(ctx):
    def report(fraction, message):
        ctx.set_progress(progress=max(0.0, min(1.0, float(fraction))), label=message)

    return report


def _celery_folds():
    from labelloop.tasks.jobs import run_folds_on_celery

    return run_folds_on_celery


def _view_choice(ctx, inputs):
    """The view-target radio FiftyOne offers (dataset / current view / selected samples)."""
    inputs.view_target(ctx)


def _run(ctx, action):
    """Run an analysis; labelloop's own errors (a missing prerequisite, no such version, Label Studio
    unreachable, an image that cannot be fetched) become a message, not a stack trace."""
    try:
        result = action()
    except (LabelloopError, ValueError) as exc:
        return {"error": str(exc)}
    ctx.ops.reload_dataset()
    return result


def _version_input(ctx, inputs, key, label, required):
    """A version-name field that says in the form, before Execute, when the name is not one of ours."""
    value = ctx.params.get(key)
    problem = None
    if value and ctx.dataset is not None:
        try:
            fo_analysis.check_version(ctx.dataset, value)
        except fo_analysis.AnalysisError as exc:
            problem = str(exc)
    inputs.str(key, label=label, required=required, invalid=problem is not None, error_message=problem or "")


def _output(ctx, keys):
    outputs = types.Object()
    outputs.str("error", label="What is missing")
    for key, label in keys:
        outputs.str(key, label=label)
    return types.Property(outputs)


class SyncLabelStudio(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="sync_label_studio", label="labelloop: sync from Label Studio",
                                  description="one sample per task, latest human annotation as ground truth, "
                                              "predictions of the version in service",
                                  dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        info = ((ctx.dataset.info or {}).get("labelloop") or {}) if ctx.dataset is not None else {}
        inputs.int("project", label="Label Studio project id", required=True, default=info.get("project"))
        inputs.str("dataset_name", label="Dataset (default labelloop-project-<id>)", required=False)
        inputs.bool("predict", label="Predict with the version in service", default=True)
        return types.Property(inputs, view=types.View(label="Sync a Label Studio project"))

    def execute(self, ctx):
        params = ctx.params
        report = _run(ctx, lambda: fo_sync.sync_project(
            params["project"], params.get("dataset_name") or None, params.get("predict", True), _progress(ctx)))
        return report if isinstance(report, dict) else report.__dict__


class ComputeMislabelScores(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="compute_mislabel_scores", label="labelloop: find mislabels (per-sample loss)",
                                  dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
                                  default_choice_to_delegated=False)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        mode = types.RadioGroup()
        mode.add_choice("in_sample", label="In-sample (fast; the served model has seen these labels: weaker)")
        mode.add_choice("out_of_sample", label="Out-of-sample (K-fold models on the training queue: stronger)")
        inputs.enum("mode", mode.values(), default="in_sample", view=mode, label="Mode")
        inputs.int("folds", label="Folds (out-of-sample)", default=5)
        inputs.bool("celery", label="Run folds as Celery jobs", default=True)
        return types.Property(inputs, view=types.View(label="Mislabel-by-loss"))

    def execute(self, ctx):
        p = ctx.params
        return _run(ctx, lambda: fo_analysis.compute_mislabel_scores(
            ctx.target_view(), p.get("mode", "in_sample"), int(p.get("folds", 5)), _progress(ctx),
            fold_runner=_celery_folds() if p.get("celery", True) else None))

    def resolve_output(self, ctx):
        return _output(ctx, [("scored", "Samples scored"), ("suspected", "Suspected mislabels"), ("field", "Field")])


class UncertaintySampling(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="uncertainty_sampling", label="labelloop: pick what to label next",
                                  dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        method = types.Dropdown()
        for m in METHODS:
            method.add_choice(m, label=m.replace("_", " "))
        inputs.enum("method", method.values(), default="least_confidence", view=method, label="Uncertainty")
        inputs.int("k", label="Budget (samples)", default=20)
        inputs.bool("diversity", label="Diverse (k-center greedy on embeddings)", default=True)
        inputs.bool("unlabeled_only", label="Only samples without a human label", default=True)
        inputs.bool("send", label="Send the selection to Label Studio as a review queue", default=False)
        return types.Property(inputs, view=types.View(label="Uncertainty sampling"))

    def execute(self, ctx):
        p = ctx.params

        def action():
            result = fo_analysis.uncertainty_sampling(ctx.target_view(), int(p.get("k", 20)),
                                                      p.get("method", "least_confidence"), bool(p.get("diversity", True)),
                                                      bool(p.get("unlabeled_only", True)), _progress(ctx))
            if p.get("send"):
                picked = ctx.dataset.select(result["selected"])
                result["label_studio"] = fo_analysis.send_to_label_studio(picked, "labelloop: label next")
            result["selected"] = len(result["selected"])
            return result

        return _run(ctx, action)


class ComputeEmbeddings(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="compute_embeddings", label="labelloop: embedding map and similarity",
                                  dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        method = types.RadioGroup()
        method.add_choice("umap", label="UMAP (default)")
        method.add_choice("pca", label="PCA (fast)")
        inputs.enum("method", method.values(), default="umap", view=method, label="Projection")
        return types.Property(inputs, view=types.View(label="Embeddings from the served model's backbone"))

    def execute(self, ctx):
        return _run(ctx, lambda: fo_analysis.compute_embeddings(ctx.target_view(), ctx.params.get("method", "umap"),
                                                                progress=_progress(ctx)))


class EvaluateModel(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="evaluate_model", label="labelloop: error analysis of a version",
                                  dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        _version_input(ctx, inputs, "version", "Version (empty: the one in service)", required=False)
        split = types.RadioGroup()
        split.add_choice("val", label="Tuning split (held out)")
        split.add_choice("all", label="All labeled samples")
        inputs.enum("split", split.values(), default="val", view=split, label="Samples")
        inputs.str("cohort", label="Cohorts by field (or 'tags')", required=False)
        inputs.float("confidence", label="High-confidence mistakes above", default=0.8)
        return types.Property(inputs, view=types.View(label="Per-class metrics, confusion matrix, cohorts"))

    def execute(self, ctx):
        p = ctx.params
        return _run(ctx, lambda: fo_analysis.evaluate_model(
            ctx.target_view(), p.get("version") or None, None if p.get("split") == "all" else "val",
            p.get("cohort") or None, float(p.get("confidence", 0.8)), _progress(ctx)))

    def resolve_output(self, ctx):
        # which samples the figures come from leads: held-out and training-sample figures differ a lot
        return _output(ctx, [("computed_on", "Computed on"), ("samples", "Samples"), ("accuracy", "Accuracy"),
                             ("high_confidence_mistakes", "High-confidence mistakes (saved view)")])


class CompareVersions(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="compare_versions", label="labelloop: compare two versions",
                                  dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        _version_input(ctx, inputs, "version_a", "Older version", required=True)
        _version_input(ctx, inputs, "version_b", "Newer version", required=True)
        return types.Property(inputs, view=types.View(label="Which samples gained or lost correctness"))

    def execute(self, ctx):
        p = ctx.params
        return _run(ctx, lambda: fo_analysis.compare_versions(ctx.target_view(), p["version_a"], p["version_b"],
                                                              progress=_progress(ctx)))


class SendToLabelStudio(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="send_to_label_studio", label="labelloop: send to Label Studio for review",
                                  dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        inputs.str("title", label="Data Manager tab title", default="labelloop review queue")
        return types.Property(inputs, view=types.View(label="A review queue labelers see as a tab"))

    def execute(self, ctx):
        return _run(ctx, lambda: fo_analysis.send_to_label_studio(ctx.target_view(),
                                                                  ctx.params.get("title") or "labelloop review queue"))


def register(p):
    for operator in (SyncLabelStudio, ComputeMislabelScores, UncertaintySampling, ComputeEmbeddings, EvaluateModel,
                     CompareVersions, SendToLabelStudio):
        p.register(operator)
