"""Output directories written as transactions, one writer at a time.

    with OutputDir(out, staged=True, force=force) as d:      # eval, undo
        write_report(d.path, ...)                              # a hidden sibling, renamed onto OUT at the end
    with OutputDir(out, resume=resume, force=force, keep=has_journal) as d:   # edit, study
        d.start()                                              # every check passed: --force clears OUT now
        ...                                                    # the run appends its journal into OUT itself

- A lock file beside OUT (``.NAME.editfast-lock``, held with ``flock``) refuses a second writer.
- OUT must be absent or empty, unless ``resume`` (appending runs continue what OUT holds) or
  ``force`` (staged: OUT is replaced when the new one is complete; appending: OUT is emptied by
  ``start()``, that is after the model loaded and every option was checked).
- On failure or interruption a staged directory is removed; an appending run keeps OUT when
  ``keep(OUT)`` says it holds something to resume (complete journal batches), else OUT is put
  back as it was (removed if this run made it).
- Leftovers of a killed run (hidden staging siblings, ``.model.*`` folders, ``.*.tmp`` files) are
  removed, with a notice, by the next run that takes the lock.
- ``inputs``: the runs the command reads (``undo``, ``export``, ``eval --edits``). OUT may
  not be one of them, hold one, or be a part of one that exists: ``--force`` would replace what the
  command reads.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from editfast.core.errors import EditfastError, raise_if_terminated, terminated
from editfast.core.paths import normal_permissions

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no lock, everything else works)
    fcntl = None


class OutputError(EditfastError):
    """An output directory that cannot be used (busy, not empty, not writable)."""


def _oserror(e: OSError, what: Path) -> OutputError:
    return OutputError(f"output directory {str(what)!r} is not writable: {e.strerror or e}")


class OutputDir:
    def __init__(self, out: str | Path, *, staged: bool = False, resume: bool = False, force: bool = False,
                 keep: Callable[[Path], bool] = lambda p: False, inputs: Sequence[str | Path] = ()):
        if not str(out).strip():
            raise OutputError("--out must name a directory, got an empty path")
        self.out = Path(out).expanduser()
        check_apart(self.out, inputs)
        self.staged, self.resume, self.force, self.keep = staged, resume, force, keep
        self.path = self.out  # where the command writes (the staging sibling when staged)
        self._lock = None
        self._made: list[Path] = []  # directories this run created (deepest last)
        self._started = False
        self._was_empty = False

    # ---------------------------------------------------------------- enter / exit
    def __enter__(self) -> "OutputDir":
        out = self.out
        if out.exists() and not out.is_dir():
            raise OutputError(f"output directory {str(out)!r} is not writable: it is a file")
        self._mkdirs(out.parent)
        self._take_lock()
        try:
            self._clean_leftovers()
            busy = out.is_dir() and any(out.iterdir())
            self._was_empty = not busy
            if busy and not (self.resume or self.force):
                raise OutputError(f"{str(out)!r} is not empty: continue its run with --resume, replace it with "
                                  "--force, or choose another --out")
            if self.staged:
                self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.editfast-tmp-", dir=out.parent))
            else:
                self._mkdirs(out)
            self._probe(self.path)
        except BaseException:
            self._rollback()
            self._release()
            raise
        return self

    def __exit__(self, kind, value, tb) -> None:
        swallowed = kind is None and terminated()  # SIGTERM/SIGINT whose exception Python dropped (in a __del__)
        try:
            if kind is None and self.staged and not swallowed:
                self._publish()
            elif kind is not None or swallowed:
                self._rollback()
        finally:
            self._release()
        if swallowed:
            raise_if_terminated()

    def start(self) -> None:
        """The work begins: with ``force``, an appending run empties OUT now."""
        self._started = True
        if self.force and not self.staged and not self.resume:
            _empty(self.out)

    # ---------------------------------------------------------------- pieces
    def _mkdirs(self, d: Path) -> None:
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            for m in reversed(missing):
                m.mkdir()
                self._made.append(m)
        except OSError as e:
            self._rollback()
            self._release()
            raise _oserror(e, d) from None

    @staticmethod
    def _probe(d: Path) -> None:
        try:
            with tempfile.NamedTemporaryFile(dir=d, prefix=".probe."):
                pass
        except OSError as e:
            raise _oserror(e, d) from None

    def _take_lock(self) -> None:
        lock = self.out.parent / f".{self.out.name}.editfast-lock"
        try:
            f = open(lock, "a+")
        except OSError as e:
            self._rollback()
            self._release()
            raise _oserror(e, self.out.parent) from None
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.seek(0)
                pid = f.read().strip() or "?"
                f.close()
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{str(self.out)!r} is being written by another editfast process (pid {pid}); "
                                      "wait for it or choose another --out") from None
                raise _oserror(e, self.out.parent) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock = (f, lock)

    def _release(self) -> None:
        if self._lock is not None:
            f, lock = self._lock
            self._lock = None
            lock.unlink(missing_ok=True)
            f.close()
        for d in reversed(self._made):  # parents this run created and left empty
            if d != self.out and d.is_dir() and not any(d.iterdir()):
                d.rmdir()

    def _clean_leftovers(self) -> None:
        """Remove what a killed run left (we hold the lock: nobody else is writing here)."""
        found = list(self.out.parent.glob(f".{self.out.name}.editfast-tmp-*"))
        if self.out.is_dir():
            found += [p for p in self.out.rglob(".*") if p.name.startswith(".model.") or
                      (p.name.endswith(".tmp") and not p.name.startswith(".batch-"))]
        for p in found:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if found:
            print(f"editfast: removed {len(found)} leftover temporary file(s) of an interrupted run "
                  f"({', '.join(p.name for p in found[:3])}{', ...' if len(found) > 3 else ''})", file=sys.stderr)

    def _publish(self) -> None:
        """Rename the staging directory onto OUT (replacing an old OUT only now)."""
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.editfast-tmp-old-", dir=self.out.parent))
            os.replace(self.out, old / "out")
        normal_permissions(self.path)  # mkdtemp made it 0700
        os.replace(self.path, self.out)
        self.path = self.out
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _rollback(self) -> None:
        """Put OUT back as it was, unless an appending run has something to resume there."""
        if self.staged:
            if self.path != self.out:
                shutil.rmtree(self.path, ignore_errors=True)
        elif self.out.is_dir() and not self.resume and not self.keep(self.out):
            if self.out in self._made:
                shutil.rmtree(self.out, ignore_errors=True)
            elif self._was_empty or (self.force and self._started):  # only this run's files are in OUT
                _empty(self.out)


def check_apart(out: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output directory that is one of the runs ``inputs``, holds one, or is a part of one
    that exists (``OutputDir``'s ``inputs``; callable early, before a model loads)."""
    dst = Path(out).expanduser().resolve()
    for given in inputs:
        src = Path(given).expanduser().resolve()
        if dst == src or dst in src.parents or (src in dst.parents and dst.exists()):
            raise OutputError(f"output directory {str(out)!r} would replace the run {str(given)!r} (or a part of "
                              "it) that the command reads: choose a directory outside it")


def new_run_dir(root: Path, stem: str) -> Path:
    """``root/stem``, else ``root/stem-2``, ``-3`` ...: the first name not taken, so a run without --out
    never writes into an earlier one."""
    k = 1
    while (path := root / (stem if k == 1 else f"{stem}-{k}")).exists():
        k += 1
    return path


def _empty(d: Path) -> None:
    """Remove what directory ``d`` holds (symbolic links themselves, never their targets)."""
    for p in list(d.iterdir()):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
