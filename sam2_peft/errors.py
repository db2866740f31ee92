"""Errors a user can fix, and how the command line reports them: one message and exit status 2, no traceback.

    sam2-peft eval --model tiny-random --data missing/        # "sam2-peft: error: ..." on stderr, exit status 2
    sam2-peft eval --debug --model tiny-random --data missing/   # the same error with its traceback
    SAM2_PEFT_DEBUG=1 accelerate launch recipes/lora_medical.py

Bad data, a wrong adapter, an unknown flag or a Hub id that cannot be reached offline raise a `UserError`
subclass (`DataError`, `AdapterMismatchError`, `ModelLoadError`, `ConfigError`, ...): the message says what, the
value, and the fix, so a traceback adds nothing. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SAM2_PEFT_DEBUG"


class UserError(Exception):
    """Base of the errors a user fixes by changing their input, flags or environment (not the code)."""


class ConfigError(UserError, ValueError):
    """Raised for a configuration value, YAML key or flag that is invalid; the message names it."""


class MissingFileError(UserError, FileNotFoundError):
    """Raised when a file or folder the user named (a `--config`, a checkpoint to resume) does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """Raised when an output folder holds another run's files (checkpoints) that the command would mix with."""


def run_command(function: Callable[[list[str]], object], argv: list[str], prog: str = "sam2-peft") -> None:
    """Run `function(argv)`, ending the process with the message and status 2 on a `UserError`.

    `--debug` (removed from `argv`) or `SAM2_PEFT_DEBUG=1` lets the error propagate with its traceback. Under
    several processes (torchrun, `accelerate launch --multi_gpu`) each message names its rank.
    """
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0", "false", "False")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        function(argv)
    except UserError as error:
        if debug:
            raise
        rank = f" [rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{prog}{rank}: error: {error}\n(run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr)
        raise SystemExit(2) from None
