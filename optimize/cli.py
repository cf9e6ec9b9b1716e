"""``python -m optimize.cli``: the command line, where worker processes and scripts have always found it
(the command itself lives in :mod:`optimize.app.cli`)."""

from .app.cli import main

if __name__ == "__main__":
    main()
