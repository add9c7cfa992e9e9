"""One module per ``reolm`` subcommand.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; :mod:`reolm.cli` imports a module only when its command
runs, so a slow import (torch, transformers) never delays ``reolm --help``.
"""
