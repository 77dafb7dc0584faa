"""What every command shares: one flag style, defaults in `--help`, and one way to fail.

An ordinary mistake (a missing or wrong path, missing data, an unknown split, a bad flag value, a folder that is
not a GSVA model) ends a command with one line, `PROG: error: ...`, naming the argument or file and what was
expected, and exit status 2. A traceback is for a real bug, or when asked for with `--debug`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

USAGE_EXIT = 2
# Exceptions the project raises for what a user gave it: paths (OSError and its kin) and values (ValueError, which the
# project's own data, loading and conversion errors derive from).
USAGE_EXCEPTIONS = (OSError, ValueError)


class UsageError(ValueError):
    """A mistake in what the user asked for; the message names the argument or file and what was expected."""


def alternate_spelling(option: str) -> str | None:
    """`--max-new-tokens` <-> `--max_new_tokens`; None for short options and one-word flags."""
    if not option.startswith("--"):
        return None
    name = option[2:]
    other = name.replace("-", "_") if "-" in name else name.replace("_", "-")
    return None if other == name else "--" + other


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each flag's default (none shown for an unset value or an off switch), and descriptions and epilogs
    laid out as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse with the project's conventions: defaults shown in `--help`, either spelling of a long flag accepted
    (`--max-new-tokens` or `--max_new_tokens`), and `--debug` to get a traceback instead of the one-line error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    def parse_known_args(self, args=None, namespace=None):
        # Every long flag, argument groups' too, also answers to its other spelling; help lists the declared one.
        for action in self._actions:
            for option in action.option_strings:
                other = alternate_spelling(option)
                if other and other not in self._option_string_actions:
                    self._option_string_actions[other] = action
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def usage_errors(prog: str, debug: bool = False, hint: str = "") -> Iterator[None]:
    """Inside this block, the project's errors about what the user gave become `PROG: error: ...` and exit 2.

    Use it around a command's set-up (arguments, data, model): the errors there are the user's. Errors in the work
    itself (a training step, an evaluation batch) are left to surface as they are."""
    try:
        yield
    except USAGE_EXCEPTIONS as error:
        if debug:
            raise
        fail(prog, describe(error) + (f" ({hint})" if hint else ""))


def name_the_cpu_for_deepspeed() -> None:
    """On a machine without CUDA, tell DeepSpeed (imported by accelerate and the Trainer when installed) that the
    device is the CPU, so it does not warn on every run that it could not find an accelerator. A user's own
    DS_ACCELERATOR stays."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def describe(error: BaseException) -> str:
    """The error's message as a user reads it: Python's own OSErrors as `FILE: reason`, the project's as written."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error) or type(error).__name__
    return "; ".join([message, *getattr(error, "__notes__", [])])


def fail(prog: str, message: str) -> None:
    """Print `PROG: error: MESSAGE` on stderr and exit with the usage status."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT)


def naming_file(error: OSError, path) -> OSError:
    """A copy of `error` (same errno and reason) naming `path`: a failed write or close (a full disk above all)
    says only "No space left on device", so `describe` gives `PATH: reason` from the copy. Raise it `from error`."""
    return OSError(error.errno, error.strerror or str(error), str(path))


def write_text_replacing(path, text: str) -> None:
    """Write `text` to `path` through a new file beside it that then replaces it, so a failed write (a full disk)
    leaves the earlier file whole, or none, never a truncated one; the OSError names `path`. The new file gets the
    mode any new file gets (0666 less the umask), and a link at `path` is replaced, never written through."""
    import os
    import secrets
    from pathlib import Path

    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise naming_file(error, path) from error


def refuse_link(path, flag: str) -> None:
    """Raise naming `flag` when `path` is a symbolic link: the commands never write or delete through one."""
    import os

    if os.path.islink(path):
        raise UsageError(
            f"{flag} {path} is a symbolic link (to {os.readlink(path)}); nothing is written or deleted through one: "
            "give the folder itself or a new one"
        )


def check_creatable(path, flag: str) -> None:
    """Raise naming `flag` unless `path` is a folder or can become one: in it when it exists, else in the nearest
    folder above it that exists, a file must be creatable. Nothing is left behind."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; give a folder")
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder; give a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(
            f"{flag} {path}: cannot create files in {existing} ({error.strerror or error}); give a writable folder"
        ) from error


__all__ = [
    "CommandParser",
    "UsageError",
    "USAGE_EXIT",
    "alternate_spelling",
    "check_creatable",
    "describe",
    "fail",
    "name_the_cpu_for_deepspeed",
    "refuse_link",
    "naming_file",
    "usage_errors",
    "write_text_replacing",
]
