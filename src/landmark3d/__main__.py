"""``python -m landmark3d`` (also what ``torchrun -m landmark3d`` runs in every process)."""

from landmark3d.cli import main

if __name__ == "__main__":
    main()
