"""Errors a user can cause. The CLI prints them as one line on stderr and exits with code 2."""


class EditfastError(ValueError):
    """Base class of every error caused by user input (bad request, model, file, option)."""


class RequestError(EditfastError):
    """A malformed edit request (subject missing from prompt, empty target, ...)."""


class DataError(EditfastError):
    """A missing, unreadable or malformed data file."""


class ModelError(EditfastError):
    """An unknown model spec or unsupported architecture."""


class HParamsError(EditfastError):
    """Unknown hyper-parameter key, wrong type or bad value."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


_sigterm = [False]


def on_sigterm(signum=None, frame=None) -> None:
    """The SIGTERM handler: remember it, then raise. Python drops an exception raised while it runs a
    ``__del__`` or a weakref callback, so the places that publish results also ask :func:`terminated`."""
    _sigterm[0] = True
    raise Terminated()


def terminated() -> bool:
    """Whether SIGTERM arrived in this process (since :func:`reset_terminated`)."""
    return _sigterm[0]


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` again if SIGTERM arrived and its exception was swallowed."""
    if _sigterm[0]:
        raise Terminated()


def reset_terminated() -> None:
    _sigterm[0] = False
