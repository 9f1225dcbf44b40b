"""Methods: the only method-specific code is how the per-layer update is solved."""

from .memit import edit_memit
from .rome import edit_rome

METHODS = {"rome": edit_rome, "memit": edit_memit}
