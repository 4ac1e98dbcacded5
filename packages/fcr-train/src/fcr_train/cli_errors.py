"""One way the command-line tools report a bad input.

Every CLI of the toolkit (``fcr-train``, ``fcr-eval``, ``fcr-human-study``, ``fcr-explorer``)
runs its command through :func:`run_cli`. An exception that means "the input is wrong" — a
:class:`UserError`, or one of the types the CLI names (``ExperimentFileError``,
``ModelNotAvailableError``, ``StoreError``, a missing file, ...) — becomes one message on stderr::

    fcr-eval: error: <what is wrong>. <what to do>

and a non-zero exit code (:data:`EXIT_USAGE` = 2 for usage and configuration errors, as argparse
uses), with no traceback unless ``--debug`` is given or the environment sets ``FCR_DEBUG=1``.
Any other exception is a bug and keeps its traceback.

The argparse ``type=`` helpers (:func:`int_at_least`, :func:`float_in`, :func:`port`) make range
errors usage errors before any work starts.

This module imports nothing heavy: a CLI can report bad input before torch is loaded.

Example::

    def main(argv=None) -> int:
        parser = build_parser()
        add_debug_argument(parser)
        args = parser.parse_args(argv)
        return run_cli(lambda: _run(args), prog="fcr-eval", debug=args.debug,
                       user_errors={"fcr_eval.spec.checker:ExperimentFileError": EXIT_USAGE})
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import socket
import sys
import traceback
from collections.abc import Callable, Mapping

__all__ = [
    "ENV_DEBUG",
    "EXIT_USAGE",
    "EXIT_MODEL_NOT_AVAILABLE",
    "EXIT_INTERRUPTED",
    "UserError",
    "add_debug_argument",
    "debug_requested",
    "run_cli",
    "user_error_code",
    "int_at_least",
    "float_in",
    "port",
    "check_port_free",
]

logger = logging.getLogger(__name__)

ENV_DEBUG = "FCR_DEBUG"
EXIT_USAGE = 2
EXIT_MODEL_NOT_AVAILABLE = 3
EXIT_INTERRUPTED = 130

# Bad input whatever the CLI: a path that is missing, of the wrong kind, or not readable.
_OS_USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                   FileExistsError)


class UserError(Exception):
    """A bad input the user can fix. The message says what is wrong and what to do.

    Args:
        message: "what is wrong. what to do".
        exit_code: the process exit code (default :data:`EXIT_USAGE`).

    Example:
        >>> raise UserError("--threads 0 must be at least 1. Pass a positive number of threads")
    """

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def add_debug_argument(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """Add ``--debug`` (show the traceback of a reported error) to ``parser``.

    Args:
        subcommand: ``parser`` is a sub-command's parser: ``--debug`` works after the command name
            too, without resetting a ``--debug`` given before it.
    """
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if subcommand else False,
                        help=f"show the full traceback of an error (also: {ENV_DEBUG}=1)")


def debug_requested(flag: bool = False) -> bool:
    """Whether tracebacks are wanted: ``flag`` (``--debug``) or ``FCR_DEBUG`` set to a true value."""
    return bool(flag) or os.environ.get(ENV_DEBUG, "").strip().lower() not in ("", "0", "false", "no")


def _names(exc: BaseException) -> set[str]:
    return {f"{c.__module__}:{c.__qualname__}" for c in type(exc).__mro__}


def user_error_code(exc: BaseException, user_errors: Mapping[str | type, int] = ()) -> int | None:
    """The exit code for ``exc`` if it is a bad input, else ``None`` (a bug).

    Args:
        exc: the exception.
        user_errors: extra bad-input types, as classes or as ``"module:QualName"`` strings (a
            string names a class without importing its module, e.g. one that imports torch).
    """
    if isinstance(exc, UserError):
        return exc.exit_code
    names = _names(exc)
    for key, code in dict(user_errors).items():
        if (isinstance(key, str) and key in names) or (isinstance(key, type) and isinstance(exc, key)):
            return code
    if isinstance(exc, _OS_USER_ERRORS):
        return EXIT_USAGE
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip()
    return text or type(exc).__name__


def run_cli(body: Callable[[], int | None], *, prog: str, debug: bool = False,
            user_errors: Mapping[str | type, int] = (),
            on_interrupt: str | None = None) -> int:
    """Run a CLI command and turn bad input into ``prog: error: message`` and an exit code.

    Args:
        body: the command; returns its exit code (``None`` = 0).
        prog: the program name printed before ``error:``.
        debug: ``--debug`` was given (``FCR_DEBUG=1`` works too): print the traceback as well.
        user_errors: exception types (classes or ``"module:QualName"``) that mean bad input,
            with their exit codes; :class:`UserError` and missing/unreadable paths always are.
        on_interrupt: printed on Ctrl-C (exit code 130); ``None`` = a plain "interrupted".

    Returns:
        The exit code. Exceptions that are not bad input propagate with their traceback.
    """
    try:
        code = body()
    except KeyboardInterrupt:
        print(f"\n{prog}: {on_interrupt or 'interrupted'}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - sorted into bad input (reported) and bugs (re-raised)
        code = user_error_code(exc, user_errors)
        if code is None:
            raise
        if debug_requested(debug):
            traceback.print_exc(file=sys.stderr)
        sys.stdout.flush()
        print(f"{prog}: error: {_message(exc)}", file=sys.stderr, flush=True)
        return code
    return 0 if code is None else int(code)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer ``>= minimum``.

    Example:
        >>> p.add_argument("--batch-size", type=int_at_least(1))
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be at least {minimum}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value"
    return parse


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number in ``[low, high]`` (``low_open`` / ``high_open``
    exclude the bound; ``None`` = unbounded).

    Example:
        >>> p.add_argument("--lam", type=float_in(0))                 # λ >= 0
        >>> p.add_argument("--lr", type=float_in(0, low_open=True))   # lr > 0
    """
    lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
    hi = "" if high is None else (f"< {high:g}" if high_open else f"<= {high:g}")
    want = " and ".join(x for x in (lo, hi) if x)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if low_open else value < low)
        bad |= high is not None and (value >= high if high_open else value > high)
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {want}")
        return value

    parse.__name__ = "float"
    return parse


def port(text: str) -> int:
    """An argparse ``type=``: a TCP port number 1–65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1-65535)")
    return value


def check_port_free(host: str, port_number: int, *, flag: str = "--port") -> None:
    """Fail with a :class:`UserError` naming ``flag`` when ``host:port_number`` cannot be bound
    (another server listens there, or the address is not of this machine).

    Example:
        >>> check_port_free("127.0.0.1", args.port)
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is free
        try:
            s.bind((host, port_number))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port_number} on {host} is already in use (another server is "
                                f"listening there). Pass a free port with {flag}, or stop the other "
                                "server") from None
            raise UserError(f"cannot serve on {host}:{port_number}: {e.strerror or e}. Check --host / "
                            f"--address and {flag}") from None
