"""The top layer: what a user runs. The command line (:mod:`.cli`), one run of the search
(:mod:`.runner`), workers on several devices, held-out validation, generation, the HTML report, the
terminal text and search_params.json. Nothing below imports from here.
"""

__all__ = ["main"]


def main(argv=None):
    """The ``optimize-sd`` command (:func:`optimize.app.cli.main`)."""
    from .cli import main as cli_main

    return cli_main(argv)
