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


# --- tests/torch_suite: PyTorch's own test suites ported to our modules (issue 16) ----------------
# They start many processes, so they run on the README's Python (3.11) only, or wherever asked for
# with `-m torch_suite` or ELASTIC_TORCH_SUITE=1. Their worker scripts in bin/ are not test modules.
collect_ignore_glob = ["torch_suite/bin/*"]
_TORCH_SUITE = os.path.join(ROOT, "tests", "torch_suite") + os.sep


def pytest_configure(config):
    config.addinivalue_line("markers", "torch_suite: a case ported from PyTorch's own tests (slow, "
                                       "process-heavy; runs on Python 3.11 or with -m torch_suite)")


@pytest.hookimpl(tryfirst=True)   # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    wanted = (sys.version_info[:2] == (3, 11) or os.environ.get("ELASTIC_TORCH_SUITE") == "1"
              or "torch_suite" in (config.getoption("markexpr", "") or ""))
    skip = pytest.mark.skip(reason="torch suite runs on Python 3.11 only (or -m torch_suite, "
                                   "ELASTIC_TORCH_SUITE=1)")
    for item in items:
        if str(item.fspath).startswith(_TORCH_SUITE):
            item.add_marker(pytest.mark.torch_suite)
            if not wanted:
                item.add_marker(skip)
