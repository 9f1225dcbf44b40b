"""``python -m editfast``: the command line."""

from editfast.cli import main

main()
