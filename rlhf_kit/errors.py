"""What counts as the user's mistake, and how a command shows one: its message once, no traceback.

A user error is a config, data file, path or gate that the kit refuses, with a message that says what to fix; a
traceback on top of it only buries the message (under `accelerate launch` it used to come twice, then accelerate's
own). Anything else is a bug and keeps its traceback. `--debug` on `rlhf-kit`, or RLHF_KIT_DEBUG=1 (which the
launched recipes inherit), shows the traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG_ENV = "RLHF_KIT_DEBUG"
# Exit status of a user error, as argparse's for a bad command line.
USER_ERROR_EXIT = 2

_PACKAGE = Path(__file__).resolve().parent


class UserError(ValueError):
    """A mistake in what the user gave; the message says what to do. A ValueError, so `except ValueError` still
    catches the kit's refusals (ConfigError, DataError, ... derive from it)."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def is_user_error(error: BaseException, own_files: tuple[str, ...] = ()) -> bool:
    """A UserError, or a ValueError / FileNotFoundError that the kit's own checks raised (many checks predate
    UserError; a missing model path is a FileNotFoundError): the innermost frame is in rlhf_kit or in `own_files`
    (a recipe). The same exceptions raised inside torch or transformers are bugs, for the traceback to show."""
    if isinstance(error, UserError):
        return True
    if not isinstance(error, (ValueError, FileNotFoundError)) or error.__traceback__ is None:
        return False
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    raised_in = Path(tb.tb_frame.f_code.co_filename).resolve()
    return raised_in.is_relative_to(_PACKAGE) or str(raised_in) in {str(Path(f).resolve()) for f in own_files}


def run_main(main: Callable[[], object]) -> None:
    """Run a recipe's main(); a user error ends the process with its message on stderr and exit status 2.

    Every process of a launch that hits the error prints it; the launcher (`accelerate launch --quiet`, as
    `rlhf-kit train` and the pipeline run it) then exits non-zero without a traceback of its own.
    """
    try:
        main()
    except Exception as error:
        if debugging() or not is_user_error(error, own_files=(main.__code__.co_filename,)):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
