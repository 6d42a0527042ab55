"""The FiftyOne plugin ships in labelloop's wheel and installs from there, not from a checkout.

A wheel is built from this tree (offline: no build isolation), installed into a folder of its own, and run
from there with the checkout out of the way (``PYTHONPATH`` puts the installed copy first: the editable
install's finder comes after it). Then a plain FiftyOne — its own settings, none of labelloop's — finds the
plugin that ``labelloop fiftyone install-plugin`` put into its plugins folder (conftest's ``mongod`` only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_FILES = ("fiftyone.yml", "__init__.py")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """site-packages-like folder holding labelloop installed from a freshly built wheel."""
    base = tmp_path_factory.mktemp("wheel")
    dist, site = base / "dist", base / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("labelloop-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in PLUGIN_FILES:
        assert f"labelloop/fiftyone_plugin/{name}" in names, f"the wheel lacks the plugin's {name}"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return site


def _run_installed(site: Path, code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    full.update(env, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=300)


def test_the_installed_package_finds_its_own_plugin(installed, tmp_path):
    found = _run_installed(installed, "import json, labelloop; from labelloop.fo.env import plugin_source, prepare; "
                                      "import os; prepare(); print(json.dumps([labelloop.__file__, str(plugin_source()), "
                                      "os.environ['FIFTYONE_PLUGINS_DIR']]))", {}, tmp_path)
    assert found.returncode == 0, found.stderr[-3000:]
    package, source, plugins_dir = json.loads(found.stdout.strip().splitlines()[-1])
    assert Path(package).is_relative_to(installed), f"labelloop came from {package}, not the installed wheel"
    assert Path(source) == installed / "labelloop" / "fiftyone_plugin"
    assert Path(plugins_dir) == installed / "labelloop", "labelloop's processes look for plugins in the package"
    for name in PLUGIN_FILES:
        assert (Path(source) / name).read_bytes() == (ROOT / "fiftyone_plugins" / "labelloop" / name).read_bytes()


def test_install_plugin_defaults_to_fiftyones_configured_plugins_dir(installed, tmp_path):
    """`labelloop fiftyone install-plugin` with no --dir: where a plain `fiftyone app launch` looks."""
    plugins = tmp_path / "fiftyone-plugins"
    config = tmp_path / "fiftyone-config.json"
    config.write_text(json.dumps({"plugins_dir": str(plugins)}))
    command = "import sys; from labelloop.cli import main; sys.exit(main(['fiftyone', 'install-plugin']))"
    done = _run_installed(installed, command, {"FIFTYONE_CONFIG_PATH": str(config), "HOME": str(tmp_path)}, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    target = plugins / "labelloop"
    assert target.is_symlink() and target.resolve() == (installed / "labelloop" / "fiftyone_plugin").resolve()
    assert str(target) in done.stdout

    copied = tmp_path / "elsewhere"
    command = f"import sys; from labelloop.cli import main; sys.exit(main(['fiftyone', 'install-plugin', '--dir', " \
              f"{str(copied)!r}, '--copy']))"
    done = _run_installed(installed, command, {"HOME": str(tmp_path)}, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (copied / "labelloop").is_symlink()
    assert sorted(p.name for p in (copied / "labelloop").iterdir()) == sorted(PLUGIN_FILES)


def test_a_plain_fiftyone_finds_the_installed_plugin(installed, tmp_path, mongod):
    """What `fiftyone app launch` run by hand loads: FiftyOne's own settings, none of labelloop's defaults,
    the plugin put into its plugins folder by `labelloop fiftyone install-plugin` from the wheel."""
    plugins = tmp_path / "plugins"
    config = tmp_path / "fiftyone-config.json"
    config.write_text(json.dumps({"plugins_dir": str(plugins), "database_uri": mongod.url,
                                  "database_validation": False, "do_not_track": True}))
    env = {"FIFTYONE_CONFIG_PATH": str(config), "HOME": str(tmp_path)}
    install = "import sys; from labelloop.cli import main; sys.exit(main(['fiftyone', 'install-plugin']))"
    assert _run_installed(installed, install, env, tmp_path).returncode == 0
    listing = _run_installed(installed, "import json, fiftyone.operators as foo; print(json.dumps(sorted("
                                        "o.uri for o in foo.list_operators() if o.uri.startswith('@labelloop/'))))",
                             env, tmp_path)
    assert listing.returncode == 0, listing.stderr[-3000:]
    uris = json.loads(listing.stdout.strip().splitlines()[-1])
    assert "@labelloop/labelloop/sync_label_studio" in uris and "@labelloop/labelloop/labelloop_versions" in uris
