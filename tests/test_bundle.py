"""The one-file bundle: built by tools/make_bundle.py, copied alone into an empty folder, run from there."""
import importlib.util
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, need, pyenv_python

GUARD = 120  # seconds, a hang guard only
RANK_SCRIPT = 'import os\nprint("RANK=%s" % os.environ["RANK"], flush=True)\n'
MODULES = ("store", "rendezvous", "elastic")
# Imports the three modules from the archive named in argv[1], says where each came from, and shows
# the last frame of a traceback raised inside elastic (a source line must be there: from bytecode too).
IMPORT_FROM = r"""
import sys, traceback
sys.path.insert(0, sys.argv[1])
import store, rendezvous, elastic
print(" ".join(m.__file__.rsplit("/", 1)[-1] for m in (store, rendezvous, elastic)))
print(getattr(elastic, "EDITED", False))
try:
    elastic.WorkerSpec("trainer", 0, print)
except ValueError as e:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    print(frame.filename, frame.line)
"""


def run(argv, cwd, timeout=GUARD):
    """Run in its own session and kill the whole group afterwards, whatever happens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PET_", "TORCHELASTIC_"))}
    proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(), err.decode()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    out = build / "elasticrun.pyz"
    code, stdout, stderr = run([sys.executable, os.path.join(ROOT, "tools", "make_bundle.py"), "-o", str(out)],
                               build)
    assert code == 0, stderr
    assert "wrote" in stdout
    alone = tmp_path_factory.mktemp("alone")
    shutil.copy2(str(out), str(alone / "elasticrun.pyz"))
    return alone / "elasticrun.pyz"


@pytest.fixture(scope="module")
def three_files(tmp_path_factory):
    """The same modules as plain files in an empty folder: what the bundle must behave like."""
    folder = tmp_path_factory.mktemp("three")
    for name in ("store.py", "rendezvous.py", "elastic.py"):
        shutil.copy2(os.path.join(ROOT, name), str(folder / name))
    return folder


def test_bundle_is_one_executable_zipapp(bundle):
    assert os.listdir(str(bundle.parent)) == ["elasticrun.pyz"]
    assert os.access(str(bundle), os.X_OK)
    with open(str(bundle), "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    with zipfile.ZipFile(str(bundle)) as zf:
        assert sorted(zf.namelist()) == ["__main__.py", "elastic.py", "elastic.pyc", "rendezvous.py",
                                         "rendezvous.pyc", "store.py", "store.pyc"]
        with open(os.path.join(ROOT, "elastic.py"), "rb") as f:
            assert zf.read("elastic.py") == f.read()


def test_build_is_reproducible(bundle, tmp_path):
    again = tmp_path / "again.pyz"
    assert run([sys.executable, os.path.join(ROOT, "tools", "make_bundle.py"), "-o", str(again)], tmp_path)[0] == 0
    assert again.read_bytes() == bundle.read_bytes()


def test_help_from_empty_folder(bundle, three_files):
    got = run([sys.executable, bundle.name, "--help"], bundle.parent)
    want = run([sys.executable, "elastic.py", "--help"], three_files)
    assert got[0] == want[0], got[2]  # the bundle runs elastic.main as the plain files do
    need(want[0] == 0, "elastic.py --help does not work yet (the launcher has not landed): %s" % want[2].strip())
    assert got[0] == 0 and "--nproc" in got[1]


def test_two_worker_job_from_empty_folder(bundle, three_files):
    for folder in (bundle.parent, three_files):
        (folder / "rank.py").write_text(RANK_SCRIPT)
    try:
        argv = ["--standalone", "--nproc-per-node", "2", "rank.py"]
        code, out, err = run([sys.executable, "elastic.py"] + argv, three_files)
        need(code == 0, "elastic.py cannot run a --standalone 2-worker job yet (launcher not landed): "
                        "exit %d, %s" % (code, err.strip()[-300:]))
        code, out, err = run([sys.executable, bundle.name] + argv, bundle.parent)
        assert code == 0, err
        assert sorted(re.findall(r"RANK=(\d+)", out)) == ["0", "1"]
    finally:
        (bundle.parent / "rank.py").unlink()


def test_bundle_ships_bytecode_for_the_building_python(bundle, tmp_path):
    """zipimport writes no bytecode: without .pyc files inside, every launch compiles the modules."""
    with zipfile.ZipFile(str(bundle)) as zf:
        for name in MODULES:
            pyc = zf.read(name + ".pyc")
            assert pyc[:4] == importlib.util.MAGIC_NUMBER, name
            assert struct.unpack("<I", pyc[4:8])[0] == 0b11, name   # checked hash: an edited .py wins
            assert pyc[8:16] == importlib.util.source_hash(zf.read(name + ".py")), name
        assert sys.implementation.cache_tag in zf.read("__main__.py").decode()   # says which Python it serves
    code, out, err = run([sys.executable, "-c", IMPORT_FROM, bundle.name], bundle.parent)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "store.pyc rendezvous.pyc elastic.pyc"
    filename, line = lines[2].split(" ", 1)
    assert filename.endswith("elastic.py") and "ValueError" in line   # tracebacks still show the source
    code, out, err = run([sys.executable, os.path.join(ROOT, "tools", "make_bundle.py"), "-o", "b.pyz"], tmp_path)
    assert code == 0 and "bytecode for" in out and sys.implementation.cache_tag in out, (out, err)


def _other_python():
    """A pyenv Python 3.8+ of another minor version than this one: the bundle's bytecode is not for it."""
    for minor in ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13"):
        if minor != "%d.%d" % sys.version_info[:2] and pyenv_python(minor):
            return pyenv_python(minor)
    return None


def test_bundle_runs_on_another_python_from_source(bundle):
    python = _other_python()
    need(python, "no pyenv Python 3.8-3.13 of another minor version than %d.%d" % sys.version_info[:2])
    code, out, err = run([python, "-c", IMPORT_FROM, bundle.name], bundle.parent)
    assert code == 0, err
    assert out.splitlines()[0] == "store.py rendezvous.py elastic.py"
    (bundle.parent / "rank.py").write_text(RANK_SCRIPT)
    try:
        code, out, err = run([python, bundle.name, "--standalone", "--nproc-per-node", "2", "rank.py"],
                             bundle.parent)
        assert code == 0, err
        assert sorted(re.findall(r"RANK=(\d+)", out)) == ["0", "1"]
    finally:
        (bundle.parent / "rank.py").unlink()


def test_an_edited_source_in_the_bundle_wins_over_its_bytecode(bundle, tmp_path):
    edited = tmp_path / "edited.pyz"
    with zipfile.ZipFile(str(bundle)) as src, zipfile.ZipFile(str(edited), "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data + b"\nEDITED = True\n" if info.filename == "elastic.py" else data)
    code, out, err = run([sys.executable, "-c", IMPORT_FROM, edited.name], tmp_path)
    assert code == 0, err
    assert out.splitlines()[:2] == ["store.pyc rendezvous.pyc elastic.py", "True"]


@pytest.mark.parametrize("minor", ["2.7", "3.6", "3.7"])
def test_bundle_on_a_too_old_python_exits_2_with_one_line(bundle, minor):
    python = pyenv_python(minor)
    if python is None:
        pytest.skip("no pyenv Python %s" % minor)
    code, out, err = run([python, bundle.name, "--standalone", "--nproc-per-node", "2", "rank.py"], bundle.parent)
    assert code == 2 and out == "", (out, err)
    assert len(err.splitlines()) == 1 and "needs Python 3.8 or newer" in err, err


def test_bytecode_for_another_python(tmp_path):
    """--bytecode-for: build on one machine's Python for the Python the cluster runs."""
    python = _other_python()
    need(python, "no pyenv Python 3.8-3.13 of another minor version than %d.%d" % sys.version_info[:2])
    code, out, err = run([sys.executable, os.path.join(ROOT, "tools", "make_bundle.py"), "-o", "other.pyz",
                          "--bytecode-for", python], tmp_path)
    assert code == 0, err
    for interpreter, want in ((python, "store.pyc rendezvous.pyc elastic.pyc"),
                              (sys.executable, "store.py rendezvous.py elastic.py")):
        code, out, err = run([interpreter, "-c", IMPORT_FROM, "other.pyz"], tmp_path)
        assert code == 0, err
        assert out.splitlines()[0] == want, interpreter
