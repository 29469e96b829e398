"""Crash-safe writes (nitro_ar.io / nitro_ar.kernels.atomic_files): umask modes, fsync of file
and folder, temporaries removed on error and swept after a kill, folders swapped whole, and
SIGKILL at every stage of a write leaving the old or the new content, never a mix."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nitro_ar import io
from nitro_ar.errors import InvalidArgumentError
from nitro_ar.kernels import atomic_files

ATOMIC_FILES = Path(atomic_files.__file__)


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if atomic_files.is_temp(p)]


@pytest.fixture
def umask():
    """Set a umask for the test; the old one is restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_and_folders_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    assert atomic_files.current_umask() == mask
    io.write_text_atomic("x", tmp_path / "a.txt")
    io.write_json_atomic({"a": 1}, tmp_path / "b.json")
    io.write_safetensors_atomic({"t": torch.zeros(2)}, tmp_path / "c.safetensors")
    for name in ("a.txt", "b.json", "c.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    with atomic_files.building_dir(tmp_path / "folder") as built:
        (built / "f").write_text("y")
        atomic_files.commit_dir(built, tmp_path / "folder")
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~mask
    assert not leftovers(tmp_path)


def test_file_and_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "f.json"
    io.write_json_atomic({"a": 1}, target)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert atomic_files.is_temp(events[0][1]) and events[1][1] == str(target)
    assert events[2][1] == str(tmp_path.resolve())


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "model.safetensors"
    io.write_safetensors_atomic({"t": torch.ones(3)}, target)

    def half_then_fail(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        io.write_safetensors_atomic({"t": torch.zeros(3)}, target)
    with pytest.raises(InvalidArgumentError, match="'t'"):
        io.write_safetensors_atomic({"t": "not a tensor"}, target)
    assert torch.equal(load_file(str(target))["t"], torch.ones(3))
    assert not leftovers(tmp_path)


def test_non_finite_json_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"ops\.norm\.b\.ms"):
        io.write_json_atomic({"ops": {"norm": {"b": {"ms": float("nan")}}}}, tmp_path / "t.json")
    with pytest.raises(InvalidArgumentError, match=r"x\[1\]"):
        io.write_json_atomic({"x": [1.0, float("inf")]}, tmp_path / "t.json")
    assert not list(tmp_path.iterdir())


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_temporaries_of_dead_or_old_writers_only(tmp_path):
    host = atomic_files._HOST
    dead = tmp_path / f".a.json.{host}-{_dead_pid()}-0abc{atomic_files.TEMP_SUFFIX}"
    dead_dir = tmp_path / f".step-1.partial.{host}-{_dead_pid()}-0abd{atomic_files.TEMP_SUFFIX}"
    live = tmp_path / f".b.json.{host}-{os.getppid()}-0abe{atomic_files.TEMP_SUFFIX}"
    other_host = tmp_path / f".c.json.elsewhere-{_dead_pid()}-0abf{atomic_files.TEMP_SUFFIX}"
    old = tmp_path / f".d.json.elsewhere-1-0ac0{atomic_files.TEMP_SUFFIX}"
    user = tmp_path / "notes.tmp"
    for path in (dead, live, other_host, old, user):
        path.write_text("x")
    dead_dir.mkdir()
    (dead_dir / "inner").write_text("x")
    stale = time.time() - atomic_files.STALE_AFTER_S - 10
    os.utime(old, (stale, stale))
    removed = atomic_files.sweep_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, dead_dir.name, old.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, user.name])


def test_first_write_into_a_folder_sweeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_files, "_swept", set())
    stale = tmp_path / f".x.{atomic_files._HOST}-{_dead_pid()}-0123{atomic_files.TEMP_SUFFIX}"
    stale.write_text("x")
    io.write_text_atomic("y", tmp_path / "y.txt")
    assert not stale.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_commit_dir_replaces_a_folder_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)
    target = tmp_path / "step-1"
    for content in ("old", "new"):
        with atomic_files.building_dir(target) as built:
            (built / "state.json").write_text(content)
            atomic_files.commit_dir(built, target)
    assert (target / "state.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


# --------------------------------------------------------------------------------------------
# SIGKILL at each stage (a subprocess that imports only the standard-library module: fast)
# --------------------------------------------------------------------------------------------
_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("atomic_files", sys.argv[1])
af = importlib.util.module_from_spec(spec); spec.loader.exec_module(af)
kind, target, content = sys.argv[2:5]
if kind == "file":
    af.write_text_atomic(content, target)
else:
    with af.building_dir(target) as built:
        (built / "a").write_text(content)
        (built / "b").write_text(content)
        af.commit_dir(built, target)
"""


def _write_in_subprocess(kind, target, content, kill_at, exchange=True):
    env = {**os.environ, atomic_files.KILL_AT_ENV: kill_at}
    code = _WRITER if exchange else _WRITER.replace("kind, target", "af._exchange = lambda a, b: False\nkind, target")
    return subprocess.run([sys.executable, "-c", code, str(ATOMIC_FILES), kind, str(target), content],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("stage", ["file-written", "file-synced", "file-renamed"])
def test_killed_file_write_leaves_old_or_new_content(tmp_path, stage):
    target = tmp_path / "config.json"
    target.write_text("old")
    done = _write_in_subprocess("file", target, "new", stage)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert target.read_text() == ("new" if stage == "file-renamed" else "old")
    atomic_files.sweep_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_folders_are_exchanged_atomically_here(tmp_path):
    """The kill tests below cover both methods; this machine's file system takes the atomic one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "in_a").write_text("")
    assert atomic_files._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "in_a").exists() and not (tmp_path / "a" / "in_a").exists()


SWAP_STAGES = [(True, "dir-built"), (True, "dir-exchanged"), (True, "dir-committed"),
               (False, "dir-built"), (False, "dir-aside"), (False, "dir-committed")]


@pytest.mark.parametrize("exchange, stage", SWAP_STAGES,
                         ids=[f"{'renameat2' if e else 'rename-aside'}-{s}" for e, s in SWAP_STAGES])
def test_killed_folder_swap_keeps_a_complete_folder(tmp_path, stage, exchange):
    target = tmp_path / "step-1"
    assert _write_in_subprocess("dir", target, "old", "none", exchange).returncode == 0
    done = _write_in_subprocess("dir", target, "new", stage, exchange)
    assert done.returncode == -signal.SIGKILL, done.stderr
    temporaries = [p for p in tmp_path.iterdir() if atomic_files.is_temp(p)]
    if stage == "dir-aside":
        # The one window of the portable method: the name is empty, both complete copies exist.
        assert not target.exists()
        assert sorted((p / "a").read_text() for p in temporaries) == ["new", "old"]
    else:
        contents = {(target / name).read_text() for name in ("a", "b")}
        assert contents == ({"old"} if stage == "dir-built" else {"new"})
    atomic_files.sweep_stale(tmp_path)
    assert not [p for p in tmp_path.iterdir() if atomic_files.is_temp(p)]
