"""``python -m editfast.cli`` (what torchrun runs): the command line."""

from editfast.cli import main

main()
