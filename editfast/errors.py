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
