"""Command-line plumbing shared by every `whatislost-*` command: user errors and their exit code.

A mistake the user can fix (a bad flag, a missing file, a broken run folder) raises
`UserError`; `run_cli` prints it as one line and exits with code 2. Anything else is a
bug and keeps its traceback. `--debug` on any command shows the traceback of a user
error too.
"""
from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file). Printed as one line, exit code 2."""


def first_line(err: BaseException) -> str:
    """An exception as one line: the first line of its message, else its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(main, argv=None, prog: str = "whatislost") -> int:
    """Run `main(argv)`; turn `UserError` into one line on stderr and exit code 2.

    `--debug` anywhere in the arguments is taken out before `main` sees them and makes
    user errors raise with their traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        return main(args) or 0
    except UserError as err:
        if debug:
            raise
        print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
