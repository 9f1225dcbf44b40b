"""Where editfast keeps things, and how it writes them (atomically: temp name, then rename)."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: cache_lock does not lock
    fcntl = None

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "_data"  # editfast/_data


def user_cache_home() -> Path:
    """$XDG_CACHE_HOME, else ~/.cache (read when called)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def cache_dir() -> Path:
    """$EDITFAST_CACHE, else $XDG_CACHE_HOME/editfast, else ~/.cache/editfast."""
    if os.environ.get("EDITFAST_CACHE"):
        return Path(os.environ["EDITFAST_CACHE"]).expanduser()
    return user_cache_home() / "editfast"


def hf_cache(sub: str, *env_keys: str) -> Path:
    """A Hugging Face cache folder as its libraries find it: the first of ``env_keys`` set, else
    $HF_HOME/<sub>, else <user cache home>/huggingface/<sub>."""
    for key in env_keys:
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / sub
    return user_cache_home() / "huggingface" / sub


def umask() -> int:
    """The process's file-creation mask, read without changing it where /proc tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | Path, recursive: bool = False) -> None:
    """Give ``path`` (and with ``recursive`` all below it) the permissions a plain mkdir or open
    would: 0o777 / 0o666 less the umask. tempfile.mkdtemp and mkstemp make 0o700 / 0o600."""
    mask = umask()
    path = Path(path)
    for p in [path, *(path.rglob("*") if recursive and path.is_dir() else ())]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds (with
    the permissions a plain open gives)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        normal_permissions(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def cache_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` for the block: another process asking for the
    same lock waits until the first leaves it, then finds its work in the cache (concurrent
    processes do expensive one-time cache work once). The lock file exists only while held. Locks
    of one process nest only by different paths. Where no lock can be taken (no fcntl, an
    unwritable cache, a file system without locks) the block runs unlocked: a cache only saves time."""
    path = Path(path)
    fd = None
    while fcntl is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                break  # locked, and still the lock file
        except FileNotFoundError:  # its holder removed it as we took it: take the next one
            pass
        except OSError:  # no lock to be had here: run unlocked
            if fd is not None:
                os.close(fd)
            fd = None
            break
        if fd is not None:  # a lock file its holder removed: try again
            os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            try:
                path.unlink()  # before the lock is released: a waiter then sees a new file
            except OSError:
                pass
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def io_error(e: BaseException) -> bool:
    """Whether `e` is a failure to write a file (OSError, or safetensors' wrapped I/O error)."""
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "I/O error" in str(e))


def warn_not_cached(path: str | Path, e: BaseException) -> None:
    """Warn that the cache entry ``path`` could not be written (the run goes on without it)."""
    reason = getattr(e, "strerror", None) or " ".join(str(e).split())
    warnings.warn(f"cannot write the cache entry {path} ({reason}); continuing without caching it",
                  RuntimeWarning, stacklevel=3)


def write_cache(path: str | Path, data: str | bytes | Callable[[Path], None]) -> bool:
    """Write a cache file atomically (``data``: text, bytes, or a function writing the temporary
    path it is given), or, when the cache cannot be written (read-only, full, a file where a
    folder should be), warn and go on: a cache only saves time. Returns whether it was written."""
    try:
        with atomic_path(path) as tmp:
            if callable(data):
                data(tmp)
            elif isinstance(data, bytes):
                tmp.write_bytes(data)
            else:
                tmp.write_text(data)
        return True
    except Exception as e:
        if not io_error(e):
            raise
        warn_not_cached(path, e)
        return False
