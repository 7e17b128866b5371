"""``python -m contsup`` (and ``torchrun -m contsup``) runs the command line."""

from contsup.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
