"""Where benchmarks keep their history: each run appends its table to ``bench/figures/<name>.md``."""

from __future__ import annotations

from pathlib import Path


def append_run(folder: Path, name: str, title: str, text: str) -> Path:
    """Print ``text`` and append it to ``folder/name`` (created with ``title`` as its heading); returns the path."""
    print(text)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        path.write_text(f"# {title}\n", encoding="utf-8")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
    return path
