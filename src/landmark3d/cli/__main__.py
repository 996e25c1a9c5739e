"""``python -m landmark3d.cli``."""

from landmark3d.cli import main

main()
