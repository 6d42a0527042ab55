"""Model registry: one directory per project and version, written atomically, plus a serving pointer.

Layout under ``MODEL_DIR``::

    projects/<project>/versions/<version>/weights.pt     the model
    projects/<project>/versions/<version>/manifest.json  version, parent, label map, counts, metrics, time
    projects/<project>/serving.json                      which version answers /predict, and why

A version directory only ever appears complete: it is assembled in ``projects/<project>/.tmp-*``
and renamed into place (rename is atomic on one filesystem), so a crash mid-write leaves at most a
stale temp dir, never a half-written version. Version names are ``p<project>-v<n>`` with n
increasing per project; two writers racing for the same n both succeed, one as n+1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labelloop.errors import LabelloopError

WEIGHTS = "weights.pt"
MANIFEST = "manifest.json"
SERVING = "serving.json"
VERSION_RE = re.compile(r"^p(?P<project>[A-Za-z0-9_.-]+)-v(?P<n>\d+)$")


class RegistryError(LabelloopError, RuntimeError):
    """No such project or version, or a name that cannot be one."""

    kind, http_status = "registry", 404


@dataclass
class Manifest:
    version: str
    project: str
    parent: str | None
    created_at: float
    task: str  # ultralytics task: classify | detect | segment
    task_type: str  # classification | detection | segmentation
    classes: list[str]  # model class names, in class-index order
    counts: dict[str, Any] = field(default_factory=dict)  # train/val images, objects per class
    metrics: dict[str, float] = field(default_factory=dict)  # on the held-out tuning split
    settings: dict[str, Any] = field(default_factory=dict)  # training settings actually used
    base: str = ""  # yaml config or weights file training started from
    weights_sha256: str = ""
    data_fingerprint: str = ""  # what annotations it was trained on (see datasets.annotation_fingerprint)
    calibration: dict[str, Any] = field(default_factory=dict)  # classification: temperature fitted on the tuning split
    # the project's model tests on the tuning split: this version's results and the serving version's beside
    model_tests: dict[str, Any] = field(default_factory=dict)
    # classification: tuning tasks it gets wrong that the serving version got right (regressed), and fixed
    changes: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # directory (filled when read)

    @property
    def weights(self) -> Path:
        return Path(self.path) / WEIGHTS

    @property
    def number(self) -> int:
        return version_number(self.version)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data


def version_number(name: str) -> int:
    match = VERSION_RE.match(name)
    if not match:
        raise RegistryError(f"not a labelloop version name: {name!r}")
    return int(match["n"])


def version_project(name: str) -> str:
    """The project a version name belongs to (``p12-v3`` → ``12``)."""
    match = VERSION_RE.match(name)
    if not match:
        raise RegistryError(f"not a labelloop version name: {name!r}")
    return match["project"]


def _safe_project(project: str | int) -> str:
    text = str(project).split(".")[0]  # Label Studio sends "<id>.<created_at>"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise RegistryError(f"invalid project id {project!r}")
    return text


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------------------------
    def project_dir(self, project: str | int) -> Path:
        return self.root / "projects" / _safe_project(project)

    def _versions_dir(self, project: str | int) -> Path:
        return self.project_dir(project) / "versions"

    def warm_start_path(self, project: str | int, architecture: str) -> Path:
        """Where the project's self-supervised warm start for ``architecture`` (a yaml name) lives."""
        return self.project_dir(project) / "warm-start" / f"{Path(architecture).stem}.pt"

    def has_warm_start(self, project: str | int) -> bool:
        directory = self.project_dir(project) / "warm-start"
        return directory.is_dir() and any(directory.glob("*.pt"))

    def warm_start(self, project: str | int, architecture: str) -> Path | None:
        path = self.warm_start_path(project, architecture)
        return path if path.is_file() else None

    # -- reading -------------------------------------------------------------------------------
    def projects(self) -> list[str]:
        base = self.root / "projects"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []

    def get(self, project: str | int, version: str) -> Manifest:
        # Names come from forms and URLs and end in a pickle load: one path component of our own shape only.
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            raise RegistryError(f"not a labelloop version name: {version!r} (expected p<project>-v<n>, e.g. p12-v3)")
        directory = self._versions_dir(project) / version
        try:
            data = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise RegistryError(f"project {_safe_project(project)} has no version {version!r}") from None
        known = set(Manifest.__dataclass_fields__)
        return Manifest(**{k: v for k, v in data.items() if k in known}, path=str(directory))

    def versions(self, project: str | int) -> list[Manifest]:
        """All complete versions of a project, oldest first."""
        directory = self._versions_dir(project)
        if not directory.exists():
            return []
        found = []
        for child in directory.iterdir():
            if VERSION_RE.match(child.name) and (child / MANIFEST).exists():
                found.append(self.get(project, child.name))
        return sorted(found, key=lambda m: m.number)

    def serving(self, project: str | int) -> Manifest | None:
        """The version that answers /predict for this project, or None before the first promotion."""
        pointer = self.project_dir(project) / SERVING
        try:
            data = json.loads(pointer.read_text())
        except FileNotFoundError:
            return None
        return self.get(project, data["version"])

    def serving_info(self, project: str | int) -> dict[str, Any] | None:
        pointer = self.project_dir(project) / SERVING
        try:
            return json.loads(pointer.read_text())
        except FileNotFoundError:
            return None

    # -- writing -------------------------------------------------------------------------------
    def add_version(self, project: str | int, weights_file: str | Path, manifest: dict[str, Any]) -> Manifest:
        """Copy weights + manifest into a new version directory, atomically; returns its manifest.

        ``manifest`` holds the Manifest fields except version/project/created_at/weights_sha256,
        which are filled here.
        """
        import hashlib

        project_dir = self.project_dir(project)
        versions = self._versions_dir(project)
        versions.mkdir(parents=True, exist_ok=True)
        tmp = project_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            shutil.copyfile(weights_file, tmp / WEIGHTS)
            with open(tmp / WEIGHTS, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
                os.fsync(fh.fileno())
            existing = [m.number for m in self.versions(project)]
            n = max(existing, default=0) + 1
            while True:
                name = f"p{_safe_project(project)}-v{n}"
                record = Manifest(
                    **{**manifest, "version": name, "project": _safe_project(project),
                       "created_at": time.time(), "weights_sha256": digest},
                )
                _write_json_atomic(tmp / MANIFEST, record.to_json())
                try:
                    os.rename(tmp, versions / name)  # fails if another writer took this name
                except OSError:
                    if (versions / name).exists():
                        n += 1
                        continue
                    raise
                record.path = str(versions / name)
                return record
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def promote(self, project: str | int, version: str, reason: str = "") -> Manifest:
        """Point the project's serving pointer at ``version`` (also how a rollback is done)."""
        manifest = self.get(project, version)  # raises if it does not exist
        _write_json_atomic(
            self.project_dir(project) / SERVING,
            {"version": version, "promoted_at": time.time(), "reason": reason},
        )
        return manifest

    def remove_stale_temp(self, older_than_s: float = 3600) -> int:
        """Delete temp dirs left by crashed writers; returns how many were removed."""
        removed = 0
        for project in self.projects():
            for tmp in self.project_dir(project).glob(".tmp-*"):
                if time.time() - tmp.stat().st_mtime > older_than_s:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        return removed

    # -- retention -------------------------------------------------------------------------------
    def promote_by_hand(self, project: str | int, version: str, reason: str = "", by: str = "") -> Manifest:
        """``promote`` for a person's choice (the API, a rollback): the promotion is also appended to
        ``projects/<project>/promotions.jsonl``, and ``prune`` never deletes a version listed there.

        The line is written (and fsynced) before the serving pointer moves, so a version can never
        serve by hand without being on record.
        """
        self.get(project, version)  # raises before anything is recorded
        record = {"version": version, "promoted_at": time.time(), "reason": reason, "by": by, "manual": True}
        with open(self.project_dir(project) / "promotions.jsonl", "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return self.promote(project, version, reason)

    def manual_promotions(self, project: str | int) -> list[dict[str, Any]]:
        """Every promotion made by hand (``promote_by_hand``), oldest first; a torn last line is skipped."""
        path = self.project_dir(project) / "promotions.jsonl"
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("version"), str):
                found.append(record)
        return found

    def prune(self, project: str | int, keep_last: int = 10) -> list[str]:
        """Delete old versions of a project; returns the names removed, oldest first.

        Kept: the serving version, the ``keep_last`` newest versions, and every version ever promoted
        by hand (``promote_by_hand``). A version is removed by renaming its directory to
        ``projects/<project>/.trash-*`` first (atomic: readers see the whole version or none) and
        deleting that afterwards; a pruner that crashes in between leaves only a ``.trash-*`` dir,
        which the next ``prune`` of the project deletes. If the version was promoted while it was
        being renamed, it is renamed back. Run it where trainings of the project are serialised (the
        training job, under the project lock): two pruners of one project at once are not supported.
        """
        keep_last = max(1, int(keep_last))
        project_dir = self.project_dir(project)
        for leftover in project_dir.glob(".trash-*"):
            shutil.rmtree(leftover, ignore_errors=True)

        def protected(versions: list[Manifest]) -> set[str]:
            keep = {m.version for m in versions[-keep_last:]}
            keep |= {p["version"] for p in self.manual_promotions(project)}
            serving = self.serving_info(project)
            if serving and isinstance(serving.get("version"), str):
                keep.add(serving["version"])
            return keep

        versions = self.versions(project)
        keep = protected(versions)
        removed = []
        for manifest in versions:
            if manifest.version in keep:
                continue
            source = Path(manifest.path)
            trash = project_dir / f".trash-{manifest.version}-{uuid.uuid4().hex}"
            try:
                os.rename(source, trash)
            except FileNotFoundError:
                continue
            if manifest.version in protected(versions):  # promoted meanwhile: put it back
                os.rename(trash, source)
                continue
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(manifest.version)
        return removed
