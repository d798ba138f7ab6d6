"""Each allowed file set, copied alone into an empty folder (or vendored inside a package), works there."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, pyenv_python

STORE_ONLY = r"""
import sys
import store
assert store.__file__.startswith(sys.argv[1]), store.__file__
with store.TCPStore("127.0.0.1", 0, is_master=True, timeout=10) as s:
    with store.TCPStore("127.0.0.1", s.port, timeout=10) as c:
        c.set("k", "v")
        assert s.get("k") == b"v" and c.add("n", 2) == 2
print("ok")
"""

AS_PACKAGE = r"""
import sys
from vend import store
assert "vend" in store.__name__
with store.TCPStore("127.0.0.1", 0, is_master=True, timeout=10) as s:
    assert s.add("n", 1) == 1
print("ok")
"""


def _copy(names, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(ROOT, name), str(folder / name))


def _run(code, cwd, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # -I: isolated mode, so nothing from the repository or site-packages can stand in for the copy
    return subprocess.run([sys.executable, "-I", "-c", code, str(cwd)] + list(args), cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=120)


def _run_in(code, cwd):
    # -I drops the script's folder from sys.path; put the copy's folder back explicitly
    return _run("import sys; sys.path.insert(0, sys.argv[1])\n" + code, cwd)


def test_store_alone(tmp_path):
    _copy(["store.py"], tmp_path)
    out = _run_in(STORE_ONLY, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_store_program_alone(tmp_path):
    _copy(["store.py"], tmp_path)
    out = subprocess.run([sys.executable, "-I", "store.py", "--help"], cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--token-file" in out.stdout


def test_store_vendored_in_a_package(tmp_path):
    _copy(["store.py"], tmp_path / "vend")
    (tmp_path / "vend" / "__init__.py").write_text("")
    out = _run_in(AS_PACKAGE, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


STORE_AND_RENDEZVOUS = r"""
import sys
import rendezvous, store
for module in (rendezvous, store):
    assert module.__file__.startswith(sys.argv[1]), module.__file__
params = rendezvous.RendezvousParameters("c10d", "127.0.0.1:0", "vendored", 1, 1, local_addr="127.0.0.1",
                                         is_host=1, join_timeout=20)
handler = rendezvous.get_rendezvous_handler(params)
try:
    info = handler.next_rendezvous()
    assert (info.rank, info.world_size) == (0, 1), info
    info.store.set("k", "v")
    assert info.store.get("k") == b"v"
finally:
    handler.shutdown()
print("ok")
"""


def test_store_and_rendezvous_alone(tmp_path):
    _copy(["store.py", "rendezvous.py"], tmp_path)
    out = _run_in(STORE_AND_RENDEZVOUS, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_store_and_rendezvous_vendored_in_a_package(tmp_path):
    _copy(["store.py", "rendezvous.py"], tmp_path / "vend")
    (tmp_path / "vend" / "__init__.py").write_text("")
    code = STORE_AND_RENDEZVOUS.replace("import rendezvous, store", "from vend import rendezvous, store")
    out = _run_in(code, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


WORKER = r"""
import os
print("rank %s of %s" % (os.environ["RANK"], os.environ["WORLD_SIZE"]), flush=True)
"""


def _launch(cwd, argv):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # -E -s rather than -I: a user runs `python3 elastic.py`, whose folder is on sys.path
    return subprocess.run([sys.executable, "-E", "-s"] + argv, cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=120)


def test_all_three_alone_run_a_two_worker_job(tmp_path):
    _copy(["store.py", "rendezvous.py", "elastic.py"], tmp_path)
    (tmp_path / "worker.py").write_text(WORKER)
    out = _launch(tmp_path, ["elastic.py", "--standalone", "--nproc-per-node", "2", "worker.py"])
    assert out.returncode == 0, out.stderr
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2", "rank 1 of 2"]


def test_all_three_vendored_in_a_package_run_a_two_worker_job(tmp_path):
    _copy(["store.py", "rendezvous.py", "elastic.py"], tmp_path / "vend")
    (tmp_path / "vend" / "__init__.py").write_text("")
    (tmp_path / "worker.py").write_text(WORKER)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from vend import elastic\n"
            "assert elastic.__name__ == 'vend.elastic'\n"
            "sys.exit(elastic.main(['--standalone', '--nproc-per-node', '2', 'worker.py']))\n")
    out = _launch(tmp_path, ["-c", code, str(tmp_path)])
    assert out.returncode == 0, out.stderr
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2", "rank 1 of 2"]


def test_all_three_alone_run_under_isolated_mode(tmp_path):
    """`python3 -I -S elastic.py`: -I leaves the script's folder off sys.path, the siblings are found anyway."""
    _copy(["store.py", "rendezvous.py", "elastic.py"], tmp_path / "three")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "three" / "elastic.py"), "--standalone",
                          "--nproc-per-node", "2", "worker.py"], cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2", "rank 1 of 2"]


@pytest.mark.parametrize("minor", ["3.6", "3.7"])
@pytest.mark.parametrize("route", ["elastic.py", "-m elastic", "store.py"])
def test_too_old_python_exits_2_with_one_line(tmp_path, minor, route):
    """Below 3.8 each entry point says which version it needs, in one line, and exits 2 at once."""
    python = pyenv_python(minor)
    if python is None:
        pytest.skip("no pyenv Python %s" % minor)
    _copy(["store.py", "rendezvous.py", "elastic.py"], tmp_path)
    (tmp_path / "worker.py").write_text(WORKER)
    argv = route.split() + (["--port", "0"] if route == "store.py" else ["--standalone", "worker.py"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run([python] + argv, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and "needs Python 3.8 or newer" in out.stderr, out.stderr


@pytest.mark.parametrize("name", ["elastic.py", "store.py"])
def test_entry_files_keep_to_python_3_6_syntax(name):
    """What lets 3.6 and 3.7 reach the version check; a guard for machines without those Pythons
    (ast's feature_version is best-effort, the run under 3.6 above is the real check)."""
    import ast
    with open(os.path.join(ROOT, name)) as f:
        ast.parse(f.read(), name, feature_version=(3, 6))
