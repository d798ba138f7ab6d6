"""Shared test fixtures: the repository root on sys.path, and where optional tools live."""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# In CI every optional tool (etcd, torch, network namespaces) must be present: a missing one fails the
# test instead of skipping it, so a broken install step can't turn the suite green by skipping.
REQUIRE_ALL = os.environ.get("ELASTIC_TEST_REQUIRE_ALL") == "1"


def need(condition, reason):
    """Skip (locally) or fail (in CI) when `condition` is false."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail("required in CI: " + reason)
    pytest.skip(reason)


@pytest.fixture
def etcd_binary():
    path = shutil.which("etcd")
    need(path, "etcd not installed (apt-get install etcd-server)")
    return path


@pytest.fixture
def torch_python():
    """The interpreter of the separate virtual environment that has torch (never the launcher's)."""
    path = os.environ.get("ELASTIC_TEST_TORCH_PYTHON") or os.path.join(ROOT, ".venv-torch", "bin", "python")
    need(os.path.exists(path), "no torch venv at %s (see .ci/run)" % path)
    return path


def pyenv_python(minor):
    """The newest pyenv CPython of one minor version ("3.7"), or None when none is installed."""
    root = os.path.join(os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv"), "versions")
    try:
        names = os.listdir(root)
    except OSError:
        return None
    patches = [n for n in names if n.startswith(minor + ".") and n[len(minor) + 1:].isdigit()]
    for name in sorted(patches, key=lambda n: int(n.rsplit(".", 1)[1]), reverse=True):
        path = os.path.join(root, name, "bin", "python")
        if os.access(path, os.X_OK):
            return path
    return None
