"""labelloop's FiftyOne plugin: ten operators and a panel, the analyst's face of the engine.

Each operator is a form plus a call into ``labelloop.fo.sync`` / ``labelloop.fo.analysis``; the numbers
come from the same engine that answers Label Studio.

How an operator runs:

* **immediately** (the App's "Execute"): a generator. The work runs in a thread of its own while the
  generator streams its progress to the App (``set_progress``), then the result, which ``resolve_output``
  lays out: counts, fields, saved views, a link back to Label Studio. A labelloop error (no model yet,
  no ground truth, Label Studio unreachable, …) ends the run with its message in the App, never a
  silent empty result.
* **delegated** (the App's "Schedule"; the default of the heavy ones: sync, out-of-sample mislabels,
  embeddings): ``labelloop delegated`` runs it, reporting with ``ctx.set_progress`` to the App's Runs
  page, and an error fails the run with its message. Out-of-sample scoring is always delegated: its K
  fold trainings run as Celery jobs on the training queue while the delegated service waits for them,
  never the App server.

Label Studio's address and token, and the backend's, are the plugin's secrets (``fiftyone.yml``):
``ctx.secrets`` first (FiftyOne's secrets provider; its default reads the environment), then the
environment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import threading

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.operators.executor import ExecutionResult
from fiftyone.operators.message import GeneratedMessage, MessageType

from labelloop.config import settings
from labelloop.errors import LabelloopError
from labelloop.fo import analysis as fo_analysis
from labelloop.fo import sync as fo_sync
from labelloop.fo import versions as fo_versions
from labelloop.labelstudio.client import StudioClient

log = logging.getLogger(__name__)
PLUGIN = "@labelloop/labelloop"
METHODS = ("least_confidence", "margin", "entropy")
SECRETS = ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LABELLOOP_BACKEND_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS")


# -- secrets and settings -----------------------------------------------------------------------------

def _secret(ctx, name: str) -> str:
    """A secret's value: FiftyOne's secrets first, the environment second, else ''."""
    value = None
    try:
        value = ctx.secrets.get(name)
    except Exception:  # a secrets provider that cannot answer is the same as no secret
        value = None
    return str(value or os.environ.get(name) or "")


def _settings(ctx):
    """labelloop's settings with Label Studio's address and token from the plugin's secrets."""
    env = settings()
    url = _secret(ctx, "LABEL_STUDIO_URL").rstrip("/")
    key = _secret(ctx, "LABEL_STUDIO_API_KEY")
    return dataclasses.replace(env, label_studio_url=url or env.label_studio_url,
                               label_studio_api_key=key or env.label_studio_api_key)


def _backend(ctx) -> fo_versions.Backend:
    return fo_versions.Backend.from_values(_secret(ctx, "LABELLOOP_BACKEND_URL") or None,
                                           _secret(ctx, "BASIC_AUTH_USER") or None,
                                           _secret(ctx, "BASIC_AUTH_PASS") or None)


def _project_link(env, project, tab=None) -> str | None:
    if not env.label_studio_url or project is None:
        return None
    return f"{env.label_studio_url}/projects/{int(project)}/data" + (f"?tab={int(tab)}" if tab is not None else "")


# -- running: progress, result, errors ------------------------------------------------------------------

def _clamp(fraction) -> float:
    try:
        return max(0.0, min(1.0, float(fraction)))
    except (TypeError, ValueError):
        return 0.0


def _plain(value):
    """JSON the browser can parse: NaN and infinities (JSON has none) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _message(exc: BaseException) -> str:
    if isinstance(exc, LabelloopError):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (unexpected: see the App server's log)"


class _Failure(GeneratedMessage):
    """The last line of a failed immediate run: the App reads a line's ``error`` and shows it."""

    def __init__(self, message: str):
        super().__init__(MessageType.ERROR, ExecutionResult, ExecutionResult(error=message, error_message=message))

    def to_json(self):
        return {**super().to_json(), "error": self.body.error_message}


class _Result(ExecutionResult):
    """The last line of a successful immediate run. The App takes a streamed ExecutionResult line's body as
    the run's result and lays it out with ``resolve_output``, so the body is the result itself."""

    def to_json(self):
        return self.result


def _execute(ctx, action):
    """Run ``action(progress)`` (it returns the result dict) the way this execution wants it.

    Delegated: here and now, progress through ``ctx.set_progress`` (the Runs page), the result returned,
    an error raised (the run fails with its message). Immediate: a generator for the App (see ``_stream``).
    """
    if ctx.delegated:
        def report(fraction, message):
            ctx.set_progress(progress=_clamp(fraction), label=str(message))

        return _plain(action(report))
    return _stream(ctx, action)


def _stream(ctx, action):
    """The App's immediate run: the work in a thread, its progress yielded as it comes, then the result
    (or the error's message: an exception cannot cross a stream the App is already reading)."""
    updates: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work():
        try:
            outcome["result"] = _plain(action(lambda fraction, message: updates.put((fraction, message))))
        except BaseException as exc:  # reported to the App below, whatever it is
            if not isinstance(exc, LabelloopError):
                log.exception("labelloop operator %s failed", ctx.operator_uri)
            outcome["error"] = exc
        finally:
            updates.put(None)

    thread = threading.Thread(target=work, name=f"labelloop-{ctx.operator_uri}", daemon=True)
    thread.start()
    yield ctx.trigger("set_progress", {"progress": 0.0, "label": "starting"})
    last = (0.0, "starting")
    finished = False
    while not finished:
        burst = [updates.get()]
        while burst[-1] is not None and not updates.empty():  # only the newest of a burst of updates is shown
            burst.append(updates.get())
        finished = burst[-1] is None
        shown = [u for u in burst if u is not None]
        if shown:
            last = (_clamp(shown[-1][0]), str(shown[-1][1]))
            yield ctx.trigger("set_progress", {"progress": last[0], "label": last[1]})
    thread.join()
    if "error" in outcome:
        yield _Failure(_message(outcome["error"]))
        return
    if last[0] < 1.0:  # the analysis said nothing at its end: the bar still ends full
        yield ctx.trigger("set_progress", {"progress": 1.0, "label": "done"})
    yield ctx.trigger("reload_dataset")
    yield GeneratedMessage(MessageType.SUCCESS, ExecutionResult, _Result(result=outcome["result"]))


def _outputs(ctx, rows, title="labelloop"):
    """``resolve_output``: the result's values named in ``rows`` (key, label), a link when there is one."""
    outputs = types.Object()
    results = ctx.results or {}
    for key, label in rows:
        if key in results and results[key] is not None:
            value = results[key]
            if isinstance(value, bool):
                outputs.bool(key, label=label)
            elif isinstance(value, int):
                outputs.int(key, label=label)
            elif isinstance(value, float):
                outputs.float(key, label=label)
            elif isinstance(value, (list, dict)):
                outputs.obj(key, label=label, view=types.JSONView())
            else:
                outputs.str(key, label=label)
    link = results.get("label_studio_link")
    if link:
        outputs.view("label_studio", types.LinkView(label="Open in Label Studio", href=link))
    return types.Property(outputs, view=types.View(label=title))


def _view_choice(ctx, inputs):
    """The view-target radio FiftyOne offers (dataset / current view / selected samples)."""
    inputs.view_target(ctx)


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


def _info(ctx) -> dict:
    return ((ctx.dataset.info or {}).get("labelloop") or {}) if ctx.dataset is not None else {}


def _config(name, label, description, heavy=False, **kwargs):
    """Every operator: dynamic, a generator for the App, delegated allowed; heavy ones scheduled by default."""
    return foo.OperatorConfig(name=name, label=label, description=description, dynamic=True,
                              execute_as_generator=True, allow_immediate_execution=True,
                              allow_delegated_execution=True, default_choice_to_delegated=heavy, **kwargs)


def _files_runner(params):
    """Where an operator's forward passes run: chunks on the prediction workers (Celery) when the operator's
    ``celery`` choice is on (the default) and a worker takes the prediction queue, else in this process."""
    if not params.get("celery", True):
        return None
    from labelloop.tasks.jobs import predict_files_on_celery, prediction_workers

    return predict_files_on_celery if prediction_workers() else None


# -- operators ------------------------------------------------------------------------------------------

class SyncLabelStudio(foo.Operator):
    @property
    def config(self):
        return _config("sync_label_studio", "labelloop: sync from Label Studio",
                       "one sample per task, latest human annotation as ground truth, predictions of the version "
                       "in service", heavy=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.int("project", label="Label Studio project id", required=True, default=_info(ctx).get("project"))
        inputs.str("dataset_name", label="Dataset (default labelloop-project-<id>)", required=False)
        inputs.bool("predict", label="Predict with the version in service", default=True)
        inputs.bool("celery", label="Predict on the prediction workers (Celery) when any is running", default=True)
        return types.Property(inputs, view=types.View(label="Sync a Label Studio project"))

    def execute(self, ctx):
        params, env = ctx.params, _settings(ctx)

        def action(progress):
            runner = _files_runner(params) if params.get("predict", True) else None
            report = fo_sync.sync_project(int(params["project"]), params.get("dataset_name") or None,
                                          bool(params.get("predict", True)), progress, env=env, runner=runner)
            result = dict(report.__dict__)
            result["errors"] = len(report.errors)
            result["first_errors"] = "; ".join(report.errors[:3]) or None
            result["label_studio_link"] = _project_link(env, params["project"])
            return result

        return _execute(ctx, action)

    def resolve_output(self, ctx):
        return _outputs(ctx, [("dataset", "Dataset"), ("added", "Samples added"),
                              ("updated_ground_truth", "Annotations updated"), ("predicted", "Samples predicted"),
                              ("version", "Predicted with"), ("marked_deleted", "Tagged ls:deleted"),
                              ("missing_images", "Images that could not be fetched"), ("errors", "Errors"),
                              ("first_errors", "First errors")], "Synced from Label Studio")


class ComputeMislabelScores(foo.Operator):
    @property
    def config(self):
        return _config("compute_mislabel_scores", "labelloop: find mislabels (per-sample loss)",
                       "in-sample from the served model, or out-of-sample from K fold models trained on the "
                       "training queue", heavy=True)

    def resolve_delegation(self, ctx):
        # the folds are trainings: the delegated service waits for them, never the App server
        return True if ctx.params.get("mode") == "out_of_sample" else None

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        mode = types.RadioGroup()
        mode.add_choice("in_sample", label="In-sample (fast; the served model has seen these labels: weaker)")
        mode.add_choice("out_of_sample", label="Out-of-sample (K fold models on the training queue: stronger; "
                                               "always scheduled, run by `labelloop delegated`)")
        inputs.enum("mode", mode.values(), default="in_sample", view=mode, label="Mode")
        inputs.int("folds", label="Folds (out-of-sample)", default=5, min=2)
        inputs.bool("celery", label="Run folds as Celery jobs (on the training workers)", default=True)
        return types.Property(inputs, view=types.View(label="Mislabel-by-loss"))

    def execute(self, ctx):
        p, view = ctx.params, ctx.target_view()
        mode = p.get("mode", "in_sample")
        if mode == "out_of_sample" and p.get("celery", True):
            from labelloop.tasks.jobs import run_folds_on_celery as runner
        else:
            runner = None

        def action(progress):
            result = fo_analysis.compute_mislabel_scores(view, mode, int(p.get("folds", 5)), progress, fold_runner=runner)
            result["saved_view"] = fo_analysis.MISLABEL_VIEW + ("" if mode == "in_sample" else "-oos")
            return result

        return _execute(ctx, action)

    def resolve_output(self, ctx):
        return _outputs(ctx, [("scored", "Samples scored"), ("suspected", "Suspected mislabels"),
                              ("field", "Field written"), ("saved_view", "Saved view (worst first)"),
                              ("cutoff", "Suspect above")], "Mislabel scores")


class UncertaintySampling(foo.Operator):
    @property
    def config(self):
        return _config("uncertainty_sampling", "labelloop: pick what to label next",
                       "uncertainty of every predicted sample; the k to label next tagged and saved as a view")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        method = types.Dropdown()
        for m in METHODS:
            method.add_choice(m, label=m.replace("_", " "))
        inputs.enum("method", method.values(), default="least_confidence", view=method, label="Uncertainty")
        inputs.int("k", label="Budget (samples)", default=20, min=1)
        inputs.bool("diversity", label="Diverse (k-center greedy on embeddings)", default=True)
        inputs.bool("unlabeled_only", label="Only samples without a human label", default=True)
        inputs.bool("send", label="Send the selection to Label Studio as a review queue", default=False)
        return types.Property(inputs, view=types.View(label="Uncertainty sampling"))

    def execute(self, ctx):
        p, view, env, dataset = ctx.params, ctx.target_view(), _settings(ctx), ctx.dataset

        def action(progress):
            result = fo_analysis.uncertainty_sampling(view, int(p.get("k", 20)), p.get("method", "least_confidence"),
                                                      bool(p.get("diversity", True)),
                                                      bool(p.get("unlabeled_only", True)), progress)
            if p.get("send"):
                with StudioClient.from_settings(env) as client:
                    sent = fo_analysis.send_to_label_studio(dataset.select(result["selected"]), "labelloop: picked in FiftyOne",
                                                            client=client)
                result["label_studio_tab"] = sent["tab"]
                result["label_studio_link"] = _project_link(env, sent["project"], sent["tab"])
            result["selected"] = len(result["selected"])
            result["tag"] = fo_analysis.UNCERTAIN_TAG
            result["saved_view"] = fo_analysis.UNCERTAIN_VIEW
            return result

        return _execute(ctx, action)

    def resolve_output(self, ctx):
        return _outputs(ctx, [("selected", "Samples picked"), ("scored", "Samples scored"), ("tag", "Tag"),
                              ("saved_view", "Saved view"), ("method", "Uncertainty"),
                              ("label_studio_tab", "Label Studio tab")], "Picked to label next")


class ComputeEmbeddings(foo.Operator):
    @property
    def config(self):
        return _config("compute_embeddings", "labelloop: embedding map and similarity",
                       "embeddings from the served model's backbone, a 2-D map and a similarity index", heavy=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        method = types.RadioGroup()
        method.add_choice("umap", label="UMAP (default)")
        method.add_choice("pca", label="PCA (fast)")
        inputs.enum("method", method.values(), default="umap", view=method, label="Projection")
        inputs.bool("celery", label="Embed on the prediction workers (Celery) when any is running", default=True)
        return types.Property(inputs, view=types.View(label="Embeddings from the served model's backbone"))

    def execute(self, ctx):
        view, method = ctx.target_view(), ctx.params.get("method", "umap")

        def action(progress):
            result = fo_analysis.compute_embeddings(view, method, progress=progress, runner=_files_runner(ctx.params))
            result["field"] = "embeddings"
            return result

        return _execute(ctx, action)

    def resolve_output(self, ctx):
        return _outputs(ctx, [("embedded", "Samples embedded"), ("field", "Field written"),
                              ("model_version", "From version"), ("visualization", "Embeddings map (brain key)"),
                              ("similarity", "Similarity index (brain key)")], "Embeddings")


class ExplainPredictions(foo.Operator):
    @property
    def config(self):
        return _config("explain_predictions", "labelloop: where the model looked",
                       "EigenCAM heatmaps of the served version on the view's samples (e.g. suspected mislabels)")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        inputs.int("limit", default=100, label="Samples to explain", description="at most 500 per run",
                   view=types.FieldView())
        return types.Property(inputs, view=types.View(label="Saliency maps of the served version"))

    def execute(self, ctx):
        view, limit = ctx.target_view(), int(ctx.params.get("limit") or 100)
        return _execute(ctx, lambda progress: fo_analysis.compute_saliency(view, limit, progress=progress))

    def resolve_output(self, ctx):
        return _outputs(ctx, [("explained", "Samples explained"), ("field", "Heatmap field"),
                              ("model_version", "Of version"), ("saved_view", "Saved view")], "Saliency")


class ModelChecks(foo.Operator):
    @property
    def config(self):
        return _config("model_checks", "labelloop: model test failures and drift",
                       "the samples that failed a version's model tests, and the imported tasks beyond the "
                       "training set, as fields and saved views")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _version_input(ctx, inputs, "version", "Version (empty: the newest that ran the project's tests)", False)
        return types.Property(inputs, view=types.View(label="Model test failures and drift"))

    def execute(self, ctx):
        dataset, version = ctx.dataset, (ctx.params.get("version") or "").strip() or None
        return _execute(ctx, lambda progress: fo_analysis.model_check_views(dataset, version, progress=progress))

    def resolve_output(self, ctx):
        return _outputs(ctx, [("test_failures", "Samples that failed a test (field failed_tests)"),
                              ("tests_failed", "Tests that failed"),
                              ("regressions", "Tuning tasks it got wrong that the serving version got right "
                                              "(field regressed_in)"),
                              ("out_of_distribution", "Imported tasks beyond the training set (field ood_ratio)"),
                              ("drifted", "Last import drifted"), ("saved_views", "Saved views")], "Model checks")


class EditModelTests(foo.Operator):
    @property
    def config(self):
        return _config("edit_model_tests", "labelloop: edit the model tests",
                       "the project's promotion gates (model tests and costs) as JSON, checked by the backend")

    def resolve_input(self, ctx):
        inputs = types.Object()
        project = _info(ctx).get("project")
        current = ""
        if project is not None:
            try:
                stored = _backend(ctx).model_tests(project)
                current = json.dumps({k: v for k, v in stored.items() if k in ("tests", "costs")}, indent=2)
            except LabelloopError as exc:
                inputs.view("unreachable", types.Warning(label="The labelloop backend", description=str(exc)))
        inputs.str("suite", default=current or '{"tests": []}', required=True, label="Model tests (JSON)",
                   description='{"tests": [{"name": "stars are stars", "kind": "confidence", "cohort": {"label": '
                               '"star"}, "min": 0.8}], "costs": {"classes": {"star": 5}}} — see README, Model tests',
                   view=types.CodeView(language="json"))
        return types.Property(inputs, view=types.View(label="Promotion gates of this project"))

    def execute(self, ctx):
        project, text = _info(ctx).get("project"), ctx.params.get("suite") or ""

        def action(progress):
            if project is None:
                raise fo_analysis.AnalysisError("this dataset was not synced from Label Studio")
            try:
                suite = json.loads(text)
            except ValueError as exc:
                raise fo_analysis.AnalysisError(f"the model tests are not valid JSON: {exc}") from None
            if not isinstance(suite, dict):
                raise fo_analysis.AnalysisError('the model tests are an object: {"tests": [...]}')
            progress(0.5, "sending them to the labelloop backend")
            saved = _backend(ctx).set_model_tests(project, suite)
            return {"tests": len(saved.get("tests") or []), "costs": bool(saved.get("costs")),
                    "names": [t["name"] for t in saved.get("tests") or []]}

        return _execute(ctx, action)

    def resolve_output(self, ctx):
        return _outputs(ctx, [("tests", "Model tests saved"), ("names", "Tests"), ("costs", "Costs set")],
                        "Model tests")


class EvaluateModel(foo.Operator):
    @property
    def config(self):
        return _config("evaluate_model", "labelloop: error analysis of a version",
                       "per-class metrics, a confusion matrix, high-confidence mistakes, cohorts")

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
        p, view = ctx.params, ctx.target_view()

        def action(progress):
            result = fo_analysis.evaluate_model(view, p.get("version") or None,
                                                None if p.get("split") == "all" else "val", p.get("cohort") or None,
                                                float(p.get("confidence", 0.8)), progress)
            result["saved_view"] = fo_analysis.MISTAKES_VIEW
            progress(1.0, f"{result['samples']} labeled sample(s) evaluated ({result['computed_on']}); "
                          f"{result['high_confidence_mistakes']} high-confidence mistake(s)")
            return result

        return _execute(ctx, action)

    def resolve_output(self, ctx):
        # which samples the figures come from leads: held-out and training-sample figures differ a lot
        return _outputs(ctx, [("computed_on", "Computed on"), ("samples", "Samples"), ("accuracy", "Accuracy"),
                              ("high_confidence_mistakes", "High-confidence mistakes"),
                              ("saved_view", "Saved view"), ("eval_key", "Evaluation (Model Evaluation panel)"),
                              ("prediction_field", "Predictions field"), ("cohorts", "Per cohort")],
                        "Error analysis")


class CompareVersions(foo.Operator):
    @property
    def config(self):
        return _config("compare_versions", "labelloop: compare two versions",
                       "which samples gained or lost correctness between two versions")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        _version_input(ctx, inputs, "version_a", "Older version", required=True)
        _version_input(ctx, inputs, "version_b", "Newer version", required=True)
        return types.Property(inputs, view=types.View(label="Which samples gained or lost correctness"))

    def execute(self, ctx):
        p, view = ctx.params, ctx.target_view()

        def action(progress):
            result = fo_analysis.compare_versions(view, p["version_a"], p["version_b"], progress=progress)
            result["saved_views"] = "labelloop-diff-gained, labelloop-diff-lost, labelloop-diff-changed"
            progress(1.0, f"{result['compared']} sample(s) compared: {result['gained']} gained, {result['lost']} lost, "
                          f"{result['changed']} changed")
            return result

        return _execute(ctx, action)

    def resolve_output(self, ctx):
        return _outputs(ctx, [("compared", "Samples compared"), ("gained", "Gained (diff:gained)"),
                              ("lost", "Lost (diff:lost)"), ("changed", "Changed (diff:changed)"),
                              ("saved_views", "Saved views")], "Version diff")


class SendToLabelStudio(foo.Operator):
    @property
    def config(self):
        return _config("send_to_label_studio", "labelloop: send to Label Studio for review",
                       "a Data Manager tab holding exactly the view's tasks")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _view_choice(ctx, inputs)
        inputs.str("title", label="Data Manager tab title", default="labelloop review queue")
        return types.Property(inputs, view=types.View(label="A review queue labelers see as a tab"))

    def execute(self, ctx):
        view, env = ctx.target_view(), _settings(ctx)
        title = ctx.params.get("title") or "labelloop review queue"

        def action(progress):
            progress(0.1, f"creating the tab {title!r} in Label Studio")
            with StudioClient.from_settings(env) as client:
                result = fo_analysis.send_to_label_studio(view, title, client=client)
            result["label_studio_link"] = _project_link(env, result["project"], result["tab"])
            progress(1.0, f"{result['tasks']} task(s) in the tab")
            return result

        return _execute(ctx, action)

    def resolve_output(self, ctx):
        return _outputs(ctx, [("tasks", "Tasks in the tab"), ("title", "Tab"), ("tab", "Tab id"),
                              ("project", "Label Studio project")], "Sent to Label Studio")


# -- the panel: versions, metrics, jobs, promote / roll back -------------------------------------------------

class VersionsPanel(foo.Panel):
    """The project's versions with their tuning-split metrics (registry), its jobs (the backend's
    ``/jobs``) and promote / roll-back buttons that call the backend's ``POST /versions/{v}/promote``."""

    @property
    def config(self):
        return foo.PanelConfig(name="labelloop_versions", label="labelloop: versions and jobs",
                               help_markdown="Versions of the Label Studio project behind this dataset, their "
                                             "metrics on the held-out tuning split, the project's jobs, and "
                                             "promotion (rollback) through the labelloop backend.")

    def on_load(self, ctx):
        self._refresh(ctx)

    def on_change_dataset(self, ctx):
        self._refresh(ctx)

    def refresh(self, ctx):
        self._refresh(ctx)

    def promote(self, ctx):
        version = ctx.params.get("version") or (ctx.event_args or {}).get("version")
        project = _info(ctx).get("project")
        try:
            fo_versions.check_promotable(project, version)
            answer = _backend(ctx).promote(version)
            ctx.panel.state.notice = (f"{answer.get('serving')} is now in service"
                                      + (f"; predictions queued (job {answer['prediction_job']})"
                                         if answer.get("prediction_job") else "")
                                      + (f"; {answer['warning']}" if answer.get("warning") else ""))
        except LabelloopError as exc:
            ctx.panel.state.notice = f"not promoted: {exc}"
        self._refresh(ctx, keep_notice=True)

    def _refresh(self, ctx, keep_notice=False):
        info = _info(ctx)
        project = info.get("project")
        state = {"project": project, "versions": [], "jobs": [], "jobs_error": None, "serving": None,
                 "rollback": None, "test_matrix": {}, "test_matrix_rows": []}
        if keep_notice:
            state["notice"] = ctx.panel.state.notice
        if project is not None:
            rows = fo_versions.versions(project)
            state["versions"] = [{**r, "serving": "in service" if r["serving"] else ""} for r in rows]
            state["serving"] = next((r["version"] for r in rows if r["serving"]), None)
            state["rollback"] = fo_versions.rollback_target(rows)
            state["test_matrix"] = fo_versions.test_matrix(project)
            state["test_matrix_rows"] = state["test_matrix"]["rows"]
            try:
                state["jobs"] = [{"kind": j.get("kind"), "state": j.get("state"),
                                  "progress": f"{100 * _clamp(j.get('progress')):.0f}%",
                                  "version": j.get("version") or "", "message": str(j.get("message") or "")[:120]}
                                 for j in _backend(ctx).jobs(project)]
            except LabelloopError as exc:
                state["jobs_error"] = str(exc)
        for key, value in state.items():
            ctx.panel.state.set(key, value)

    def render(self, ctx):
        panel = types.Object()
        state = ctx.panel.state
        project = state.get("project")
        if project is None:
            panel.md("This dataset was not synced from Label Studio: run **labelloop: sync from Label Studio** "
                     "first.", name="intro")
            return types.Property(panel, view=types.GridView(orientation="vertical"))
        rows = state.get("versions") or []
        serving = state.get("serving")
        panel.md(f"### Label Studio project {project}\n\nIn service: **{serving or 'no version yet'}** · "
                 f"{len(rows)} version(s) in the registry", name="header")
        if state.get("notice"):
            panel.md(str(state.get("notice")), name="notice")
        if rows:
            table = types.TableView()
            for key, label in (("version", "Version"), ("created", "Trained"), ("primary", "Primary metric (tuning)"),
                               ("train_images", "Train images"), ("tuning_images", "Tuning images"),
                               ("tests", "Model tests"), ("serving", "In service")):
                table.add_column(key, label=label)
            panel.list("versions", types.Object(), view=table)
            buttons = types.Object()
            rollback = state.get("rollback")
            if rollback:
                buttons.btn("rollback", label=f"Roll back to {rollback}", on_click=self.promote,
                            params={"version": rollback}, variant="outlined")
            for row in rows[:5]:
                if not row["serving"]:
                    buttons.btn(f"promote_{row['version'].replace('-', '_')}", label=f"Promote {row['version']}",
                                on_click=self.promote, params={"version": row["version"]})
            buttons.btn("refresh", label="Refresh", on_click=self.refresh, variant="outlined")
            panel.add_property("actions", types.Property(buttons, view=types.HStackView()))
        matrix = state.get("test_matrix") or {}
        if matrix.get("rows"):
            panel.md("#### Model tests on the tuning split (newest versions side by side)", name="tests_title")
            tests = types.TableView()
            tests.add_column("test", label="Test")
            tests.add_column("bar", label="Bar")
            for k, version in enumerate(matrix.get("versions") or []):
                tests.add_column(f"v{k}", label=version)
            panel.list("test_matrix_rows", types.Object(), view=tests)
        analyses = types.Object()  # the operators' forms, opened from here (prompt=True)
        for name, label, params in (("model_checks", "Test failures and drift…", None),
                                    ("edit_model_tests", "Edit model tests…", None),
                                    ("evaluate_model", "Error analysis…", None),
                                    ("compute_mislabel_scores", "Find mislabels…", None),
                                    ("uncertainty_sampling", "Pick what to label next…", None),
                                    ("sync_label_studio", "Sync from Label Studio…", {"project": project})):
            analyses.btn(f"open_{name}", label=label, on_click=f"{PLUGIN}/{name}", prompt=True, params=params,
                         variant="outlined")
        panel.add_property("analyses", types.Property(analyses, view=types.HStackView()))
        jobs_error = state.get("jobs_error")
        if jobs_error:
            panel.md(f"Jobs: {jobs_error}", name="jobs_error")
        else:
            jobs = types.TableView()
            for key, label in (("kind", "Job"), ("state", "State"), ("progress", "Progress"), ("version", "Version"),
                               ("message", "Message")):
                jobs.add_column(key, label=label)
            panel.md("#### Jobs", name="jobs_title")
            panel.list("jobs", types.Object(), view=jobs)
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=2))


def register(p):
    for operator in (SyncLabelStudio, ComputeMislabelScores, UncertaintySampling, ComputeEmbeddings, EvaluateModel,
                     CompareVersions, SendToLabelStudio, ExplainPredictions, ModelChecks, EditModelTests, VersionsPanel):
        p.register(operator)
