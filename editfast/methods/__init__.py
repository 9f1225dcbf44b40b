"""Layer 5, the editing methods, one file (or one package) each, found through one registry.

``base`` is the neutral seam every method implements; ``locate_then_edit/`` is the pipeline ROME,
MEMIT and their successors share; ``mend/`` holds MEND's network and trainer; ``hparams`` is the
hyper-parameters' base and file reading; ``registry`` finds the methods (every module or package
here that defines ``METHOD``) and builds their hyper-parameters. Imports: layers 1-4.
"""

from editfast.methods.registry import METHODS, get_method

__all__ = ["METHODS", "get_method"]
