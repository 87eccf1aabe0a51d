"""What every command-line tool shares: one error wrapper and one output-path helper.

    @cli("train.py")
    def main(argv=None) -> int: ...

Exit codes and what is printed, for every tool:

    0     success
    2     bad input: a usage error (argparse), or one of the project's input errors (CLIError,
          ValueError: a bad config, a bad checkpoint (CheckpointError), a non-finite value
          (NonFiniteError); OSError: a file that is missing, unreadable or unwritable; MemoryError).
          ONE line on stderr, "<prog>: error: <message>", no traceback. Set TOOLS_TRACEBACK=1 to
          see the traceback as well.
    130   Ctrl-C, one line
    141   stdout closed early (`... | head`): nothing more is printed (as a process killed by SIGPIPE)
    1     anything else is a bug: its traceback is printed under a line saying so, to be reported.

Output paths (--json, --plot, --out) are checked with `output_file` / `output_dir` BEFORE the work
starts: a path that is a folder, lies under a file, sits in a missing or unwritable folder, or is an
existing file that cannot be written is one CLIError (one line, exit 2) in the first second, not a
traceback after an hour of training. `write_output` then writes the file atomically (temp file in
the same folder, fsync, os.replace; manual.checkpoint.write_atomic), so a killed tool never leaves a
torn file.
"""
from __future__ import annotations

import functools
import io
import os
import sys
import tempfile
import traceback
from pathlib import Path

BUG_LINE = "this is a bug; please report it with the traceback below"


class CLIError(Exception):
    """A bad command-line input, said in one line (exit code 2)."""


# the project's input errors: said in one line with exit code 2 (CheckpointError and NonFiniteError are ValueErrors)
INPUT_ERRORS = (CLIError, ValueError, OSError, MemoryError)


def cli(prog: str):
    """Decorator for a tool's main(argv) -> int: the exit-code policy of the module docstring."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                code = main(argv)
                sys.stdout.flush()            # a closed pipe shows here, not in the interpreter's exit
                return code
            except BrokenPipeError:
                _silence_stdout()
                return 141
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except INPUT_ERRORS as exc:
                if os.environ.get("TOOLS_TRACEBACK"):
                    traceback.print_exc()
                print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
                return 2
            except Exception:                 # noqa: BLE001 - not swallowed: shown in full, marked as a bug
                print(f"{prog}: internal error: {BUG_LINE}", file=sys.stderr)
                traceback.print_exc()
                return 1
        return run
    return wrap


def one_line(exc: BaseException) -> str:
    """The message of an exception on one line (multi-line messages joined with ' | ')."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, MemoryError):
        text = f"out of memory{': ' + str(exc) if str(exc) else ''}; use a smaller model, batch or sequence length"
    else:
        text = str(exc) or type(exc).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


# ------------------------------------------------------------------------------------------------
# output paths

def _writable_dir(folder: Path, flag: str, path) -> None:
    if not folder.exists():
        raise CLIError(f"{flag} {path}: the folder {folder} does not exist (create it first)")
    if not folder.is_dir():
        raise CLIError(f"{flag} {path}: {folder} is a file, not a folder")
    _probe(folder, flag, path)


def _probe(folder: Path, flag: str, path) -> None:
    """Create and remove a temp file in `folder`: the one test that is right for root, read-only mounts
    and ACLs alike (os.access is not)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write in the folder {folder} ({exc.strerror or exc})") from None


def output_file(path, flag: str) -> Path | None:
    """Check that the file `path` (given to `flag`) can be written, before any work; None stays None."""
    if path is None:
        return None
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise CLIError(f"{flag} {path}: is a folder; give a file name")
    _writable_dir(p.parent if str(p.parent) else Path("."), flag, path)
    if p.exists() and not os.access(p, os.W_OK):
        raise CLIError(f"{flag} {path}: the file exists and is not writable")
    return p


def output_dir(path, flag: str) -> Path | None:
    """Make sure the folder `path` (given to `flag`) exists and is writable, creating it and its parents
    if needed, before any work; None stays None."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {path}: is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot create the folder ({exc.strerror or exc})") from None
    _probe(p, flag, path)
    return p


def write_output(path, data) -> None:
    """Write str (UTF-8) or bytes to `path` atomically."""
    from manual.checkpoint import write_atomic

    write_atomic(path, data.encode("utf-8") if isinstance(data, str) else bytes(data))


def save_figure(fig, path) -> None:
    """A matplotlib figure as PNG, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_output(path, buf.getvalue())
