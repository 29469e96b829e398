"""Crash-safe file writes (standard library only, shared by the kernels' tuning cache and
:mod:`nitro_ar.io`).

Every file is written through a temporary file in its own folder: written, ``fsync``-ed, given
the mode a plain ``open()`` would give (``0o666 & ~umask``; ``mkstemp`` alone gives 0600),
renamed over the target, and the folder ``fsync``-ed so the rename itself survives a power
loss. A reader therefore sees the old file or the new one, never a truncated one.

Temporary names are ``.<target>.<host>-<pid>-<random>.nitro.tmp``: removed on any error, and
those of killed writers are swept from a folder the first time this process writes into it
(:func:`sweep_stale`: the writer's pid is gone on this host, or the entry is older than
:data:`STALE_AFTER_S`).

Folders (training checkpoints) are built the same way under a temporary name and swapped in
by :func:`commit_dir`; on Linux an existing folder is exchanged atomically (``renameat2``), so
the folder's name always holds a complete copy, old or new.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Iterator, List, Set, Union

__all__ = [
    "TEMP_SUFFIX",
    "STALE_AFTER_S",
    "KILL_AT_ENV",
    "crash_point",
    "current_umask",
    "file_mode",
    "dir_mode",
    "temp_path",
    "is_temp",
    "sweep_stale",
    "fsync_dir",
    "atomic_path",
    "write_bytes_atomic",
    "write_text_atomic",
    "building_dir",
    "commit_dir",
]

PathLike = Union[str, os.PathLike]

TEMP_SUFFIX = ".nitro.tmp"
# Temporaries of another host (shared file systems) are only swept by age; an active writer
# keeps its file's mtime fresh, and nothing this project writes stays open this long.
STALE_AFTER_S = 6 * 3600.0
# Test hook: SIGKILL this process when a write reaches the named stage (see `crash_point`).
KILL_AT_ENV = "NITRO_AR_KILL_AT"
_HOST = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:24] or "host"
_TEMP_RE = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+" + re.escape(TEMP_SUFFIX) + "$")
_swept: Set[str] = set()


def crash_point(name: str) -> None:
    """A point a crash test can kill the process at (``NITRO_AR_KILL_AT=<name>``)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def current_umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no read-only query elsewhere: set and restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def temp_path(target: PathLike) -> Path:
    """A fresh temporary name next to ``target`` (not created)."""
    target = Path(target)
    return target.parent / f".{target.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def is_temp(path: PathLike) -> bool:
    """Whether ``path`` is named like one of our temporary files or folders."""
    return _TEMP_RE.match(Path(path).name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep_stale(folder: PathLike, max_age_s: float = STALE_AFTER_S) -> List[Path]:
    """Remove temporaries left in ``folder`` by killed writers; returns what was removed.

    A temporary is stale when its writer (same host) no longer runs, or when it has not been
    modified for ``max_age_s`` seconds. Temporaries of live writers are left alone.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None:
            continue
        pid = int(match.group("pid"))
        same_host = match.group("host") == _HOST
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        dead = same_host and pid != os.getpid() and not _pid_alive(pid)
        if dead or age > max_age_s:
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    if key not in _swept:
        _swept.add(key)
        sweep_stale(folder)


def fsync_dir(folder: PathLike) -> None:
    """Flush a folder's entries (renames, creations) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems refuse fsync on folders; the data files were flushed
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: PathLike) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target`` to write; on success it becomes ``target``.

    The caller writes the temporary (by name: it exists, empty). On leaving the block the file
    is fsync-ed, given :func:`file_mode`, renamed over ``target`` and the folder fsync-ed. On
    an error the temporary is removed and ``target`` is untouched. The parent folder is
    created if needed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(target.parent)
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        yield tmp
        crash_point("file-written")
        _fsync_file(tmp)
        os.chmod(tmp, file_mode())
        crash_point("file-synced")
        os.replace(tmp, target)
        crash_point("file-renamed")
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(data: bytes, target: PathLike) -> Path:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_path`); returns ``target``."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return Path(target)


def write_text_atomic(text: str, target: PathLike, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically (see :func:`atomic_path`); returns ``target``."""
    return write_bytes_atomic(text.encode(encoding), target)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (files first, then their folders)."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_file(os.path.join(root, name))
        fsync_dir(root)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@contextlib.contextmanager
def building_dir(target: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target``, removed if the block fails. Commit
    it with :func:`commit_dir` inside the block."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(target.parent)
    tmp = temp_path(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise


def commit_dir(built: PathLike, target: PathLike) -> None:
    """Make the complete folder ``built`` (from :func:`building_dir`) appear as ``target``.

    Every file and folder under ``built`` is fsync-ed and the folder given :func:`dir_mode`.
    A new ``target`` is a plain rename. An existing one is exchanged atomically where the OS
    can (the name holds the old copy until the very instant it holds the new one), else
    renamed aside first; the old copy is then deleted.
    """
    built, target = Path(built), Path(target)
    _fsync_tree(built)
    os.chmod(built, dir_mode())
    crash_point("dir-built")
    if not target.exists():
        os.rename(built, target)
    elif _exchange(built, target):
        crash_point("dir-exchanged")  # `built` now holds the old copy, under a temporary name
    else:
        aside = temp_path(target)
        os.rename(target, aside)
        crash_point("dir-aside")
        try:
            os.rename(built, target)
        except BaseException:
            os.rename(aside, target)
            raise
        built = aside
    fsync_dir(target.parent)
    crash_point("dir-committed")
    _remove(built)
