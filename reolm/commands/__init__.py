"""One module per ``reolm`` subcommand.

Each module defines ``DESCRIPTION`` (its ``--help`` text), ``add_arguments(parser)`` and
``run(args) -> int``, and optionally ``epilog()`` (text after the options, e.g. every config key)
and ``INTERMIXED = True`` (options and positionals in any order). The one-line help of every
command lives in :data:`reolm.cli.COMMANDS` only; :mod:`reolm.cli` imports a module only when its
command runs, so a slow import (torch, transformers) never delays ``reolm --help``.
"""


class CommandError(Exception):
    """A failure whose message is written for the user: ``reolm`` prints it without a traceback
    (as it does for the library's ValueErrors and OSErrors) and exits 1."""
