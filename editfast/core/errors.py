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


_signalled: list[type[BaseException] | None] = [None]  # the interruption that arrived, if any


def on_sigterm(signum=None, frame=None) -> None:
    """The SIGTERM handler: remember it, then raise. Python drops an exception raised while it runs a
    ``__del__`` or a weakref callback, so the places that publish results also ask :func:`terminated`."""
    _signalled[0] = Terminated
    raise Terminated()


def on_sigint(signum=None, frame=None) -> None:
    """The SIGINT handler: Ctrl-C, remembered like SIGTERM (its KeyboardInterrupt can be dropped too)."""
    _signalled[0] = KeyboardInterrupt
    raise KeyboardInterrupt()


def terminated() -> bool:
    """Whether SIGTERM or SIGINT arrived in this process (since :func:`reset_terminated`)."""
    return _signalled[0] is not None


def raise_if_terminated() -> None:
    """Raise the interruption (:class:`Terminated` or KeyboardInterrupt) again if one arrived and its
    exception was swallowed."""
    if _signalled[0] is not None:
        raise _signalled[0]()


def reset_terminated() -> None:
    _signalled[0] = None


def unraisable_hook(previous):
    """A ``sys.unraisablehook`` that stays silent about an interruption Python dropped in a ``__del__``
    (it is remembered and raised again where results are published) and passes anything else on."""
    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
            previous(unraisable)
    return hook
