"""Running the plugin's operators the ways FiftyOne runs them, from a test process.

``run_immediately`` does what the App server's ``/operators/execute/generator`` endpoint does (the App
runs our operators as generators): FiftyOne's executor, then the generator read line by line, each line
the JSON the browser receives. ``schedule`` queues a delegated operation as the App's "Schedule" does.
fiftyone is imported inside the functions (conftest's ``mongod`` prepares its environment first).
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field

PLUGIN = "@labelloop/labelloop"


@dataclass
class Run:
    result: dict | None
    error: str | None
    progress: list[tuple[float, str]] = field(default_factory=list)
    triggered: list[str] = field(default_factory=list)


def _request(view, params: dict, **extra) -> dict:
    from labelloop.fo.env import dataset_name

    return {"dataset_name": dataset_name(view), "view": view.view()._serialize(),
            "params": {"view_target": "CURRENT_VIEW", **params}, **extra}


def run_immediately(view, operator: str, **params) -> Run:
    """Execute ``operator`` on ``view`` immediately, as the App does; the streamed lines decoded."""
    from fiftyone.operators.executor import ExecutionError, execute_or_delegate_operator

    try:
        outcome = asyncio.run(execute_or_delegate_operator(f"{PLUGIN}/{operator}", _request(view, params),
                                                           exhaust=False))
    except ExecutionError as exc:  # the form's validation (resolve_input) refused the parameters
        return Run(None, str(exc))
    if outcome.error:
        return Run(None, outcome.error_message or outcome.error)
    assert inspect.isgenerator(outcome.result), f"{operator} did not run as a generator: {outcome.result!r}"
    run = Run(None, None)
    for message in outcome.result:
        line = message.to_json()
        if line.get("error"):
            run.error = line["error"]
        elif line["cls"] == "InvocationRequest":
            body = line["body"]
            run.triggered.append(body["operator_uri"])
            if body["operator_uri"] == "set_progress":
                run.progress.append((body["params"].get("progress"), body["params"].get("label")))
        elif line["cls"] == "ExecutionResult":
            run.result = line["body"]  # what the App takes as the result (and lays out with resolve_output)
    return run


def run(fo, view, operator: str, **params) -> dict:
    """``run_immediately`` that must succeed: the result, with the dataset reloaded."""
    from labelloop.fo.env import dataset_name

    outcome = run_immediately(view, operator, **params)
    assert outcome.error is None, outcome.error
    assert outcome.result is not None, f"{operator} streamed no result"
    assert outcome.progress, f"{operator} streamed no progress"
    fo.load_dataset(dataset_name(view)).reload()
    return outcome.result


def schedule(view, operator: str, **params):
    """Queue ``operator`` as a delegated operation (the App's "Schedule"); returns its operation id."""
    from fiftyone.operators import execute_operator

    outcome = execute_operator(f"{PLUGIN}/{operator}", ctx={"dataset": view._root_dataset, "view": view.view(),
                                                            "params": {"view_target": "CURRENT_VIEW", **params},
                                                            "request_delegation": True})
    assert outcome.delegated, f"{operator} was not delegated: {outcome.to_json()}"
    return outcome.result["id"]
