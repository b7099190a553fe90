"""What every command line of the project shares: one-line errors and quiet library logs.

A bad path, folder or value ends any CLI the same way: one line on stderr naming it and the
fix, exit status 2, no traceback. `--verbose` brings back the tracebacks and the log lines
of the libraries underneath (orbax's `WARNING:absl:...read only...` on every restore).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

USAGE_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a --verbose flag and a one-line error instead of the usage block."""

    def __init__(self, prog: str, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="show library log messages and full tracebacks")

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def run(main: Callable[[argparse.Namespace], int | None], parser: ArgumentParser,
        argv=None) -> int:
    """Parse argv, silence library logs unless --verbose, and return main(args)'s status;
    a ValueError or OSError (bad value, path or folder) becomes one line and status 2."""
    args = parser.parse_args(argv)
    # orbax logs through absl; NOTSET: the root logger's level decides again
    logging.getLogger("absl").setLevel(logging.NOTSET if args.verbose else logging.ERROR)
    try:
        return main(args) or 0
    except (ValueError, OSError) as e:
        if args.verbose:
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
