"""``optimize-sd`` and ``python -m optimize.cli`` (how worker processes start): the command line, whose
commands live in :mod:`optimize.app.cli`. Ctrl-C while those load (a second or more: torch, diffusers)
is one line and exit 130, not a traceback from the middle of an import."""

import sys


def main(argv=None) -> None:
    try:
        from .app.cli import main as command
    except KeyboardInterrupt:
        print("optimize-sd: interrupted", file=sys.stderr)
        sys.exit(130)
    command(argv)


if __name__ == "__main__":
    main()
