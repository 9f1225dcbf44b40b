"""The exit-code policy and the signals, for every command (``run``).

An error a user can cause is one line on stderr, ``editfast: error: ...``, and exit code 2: a bad
option or value (click's usage errors), bad input (``EditfastError``), a full disk, a quota, a
refused permission or a read-only file system on a path, or a path of the wrong kind (a file where
a folder is needed or the other way round, a name too long, a loop of links): the line names the
path, whichever step met it, so no command needs its own try/except for them. Ctrl-C
(SIGINT) exits 130 and SIGTERM 143, after the same cleanup. Both signals are remembered, so that
one Python swallowed (in a ``__del__``) is raised again at the next batch boundary
(``raise_if_terminated``). Anything else is a bug: raised on, with its traceback. ``NOTES`` are said
after the message (e.g. how to resume).
"""

from __future__ import annotations

import errno
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import click

from editfast.core.errors import (
    EditfastError,
    Terminated,
    on_sigint,
    on_sigterm,
    raise_if_terminated,
    reset_terminated,
    unraisable_hook,
)

NOTES: list[str] = []  # said after an error or interruption (e.g. how to resume)
ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}  # the machine's, not a bug
PATH_ERRNOS = {  # a path of the wrong kind, as the user gave it (said only when the error names the path)
    errno.ENOTDIR: "a file is where a folder is needed",
    errno.EEXIST: "a file is where a folder is needed",
    errno.EISDIR: "a folder is where a file is needed",
    errno.ENAMETOOLONG: None,
    errno.ELOOP: None,
    errno.EFBIG: None,
}


def outcome(e: BaseException) -> tuple[int, str] | None:
    """The exit code and one-line message for an exception that ends a command; None for a bug."""
    if isinstance(e, (click.exceptions.Abort, KeyboardInterrupt)):
        return 130, "interrupted"
    if isinstance(e, Terminated):
        return 143, "terminated (SIGTERM)"
    if isinstance(e, click.ClickException):
        return 2, e.format_message().replace("\n", " ")
    if isinstance(e, EditfastError):
        return 2, str(e).replace("\n", " ")
    if isinstance(e, OSError) and (e.errno in ENV_ERRNOS or (e.errno in PATH_ERRNOS and e.filename)):
        where = f"{e.filename}: " if e.filename else ""
        why = f" ({PATH_ERRNOS[e.errno]})" if PATH_ERRNOS.get(e.errno) else ""
        return 2, f"{where}{e.strerror or e}{why}"
    return None


def fail(message: str, code: int = 2) -> None:
    """Say ``message`` on stderr (``editfast: error: ...`` for code 2) and exit with ``code``."""
    click.echo(f"editfast: {'error: ' if code == 2 else ''}{message}", err=True)
    sys.exit(code)


@contextmanager
def note_on_failure(note: Callable[[], str | None]) -> Iterator[None]:
    """If the block fails, add ``note()`` (when it says something) to the NOTES said after the error."""
    try:
        yield
    except BaseException:
        if said := note():
            NOTES.append(said)
        raise


@contextmanager
def signals_remembered() -> Iterator[None]:
    """SIGINT and SIGTERM raise (and are remembered) in the main thread; a dropped interruption is
    not reported as unraisable. Everything is restored afterwards."""
    reset_terminated()
    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
                    signal.SIGINT: signal.signal(signal.SIGINT, on_sigint)}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    hook, sys.unraisablehook = sys.unraisablehook, unraisable_hook(sys.unraisablehook)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
        reset_terminated()  # answered (exit 130/143): what runs next in this process starts clean


def run(command: Callable[[], object]) -> None:
    """Run ``command`` under the policy: return on success, else exit with the ``outcome``'s code
    and message (and the NOTES); a bug is raised on."""
    NOTES.clear()
    with signals_remembered():
        try:
            command()
            raise_if_terminated()
        except click.exceptions.Exit as e:  # --help, --version
            sys.exit(e.exit_code)
        except BaseException as e:
            if (got := outcome(e)) is None:
                raise
            fail("; ".join([got[1]] + NOTES), got[0])
