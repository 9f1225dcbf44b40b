"""Loading through transformers quietly: its errors as one line, its warnings and progress output
kept off the terminal, and which of its exceptions mean a file that cannot be loaded.
"""

from __future__ import annotations

import io
import struct
from contextlib import contextmanager, nullcontext, redirect_stderr

import torch
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace runs collapsed), cut at `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# what a bad file makes transformers, safetensors or gguf raise (a MemoryError is not a bad file)
_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, EOFError,
                struct.error)


def _load_error(e: BaseException) -> bool:
    try:  # a config value of the wrong type (transformers' strict config dataclasses)
        from huggingface_hub.errors import StrictDataclassError  # newer huggingface_hub only
    except ImportError:  # pragma: no cover
        StrictDataclassError = SafetensorError
    return (isinstance(e, (*_LOAD_ERRORS, SafetensorError, StrictDataclassError))
            and not isinstance(e, torch.OutOfMemoryError))


@contextmanager
def _hf_errors_only():
    """Silence transformers' warnings (its multi-line load report becomes editfast's own error).
    Where transformers' progress bars are off (``--quiet``), the bars it draws with plain tqdm
    (GGUF de-quantisation) are kept off stderr too."""

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = nullcontext() if hf_logging.is_progress_bar_enabled() else redirect_stderr(io.StringIO())
    try:
        with bars:
            yield
    finally:
        hf_logging.set_verbosity(level)
