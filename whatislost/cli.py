"""Command-line plumbing shared by every `whatislost-*` command: user errors and their exit code.

A mistake the user can fix (a bad flag, a missing file, a broken run folder) raises
`UserError`; `run_cli` prints it as one line and exits with code 2. Anything else is a
bug and keeps its traceback. `--debug` on any command shows the traceback of a user
error too.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


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


def warn(msg: str, log: list, prog: str = "whatislost-eval"):
    """A warning kept in `log` (summary.json) and printed as one line on stderr."""
    log.append(msg)
    print(f"{prog}: warning: {msg}", file=sys.stderr)


def progress(iterable, desc: str, unit: str = "it", total: int | None = None):
    """A tqdm bar on stderr for one stage of the eval, shown only when stderr is a terminal (tests and logs stay
    clean) and removed when the stage ends."""
    from tqdm import tqdm

    return tqdm(iterable, desc=f"whatislost-eval: {desc}", unit=unit, total=total, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


@contextmanager
def timed(stage: str, timing: dict):
    """Adds the seconds the block took to timing[stage] (summary.json 'timing')."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = round(timing.get(stage, 0.0) + time.perf_counter() - start, 3)
