"""``python -m scanner`` is ``vmleak``."""

from scanner.cli import main

main()
