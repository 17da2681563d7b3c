"""Printing for the command line verbs: a reader that goes away ends the output quietly.

`luxsci-proxy check | head -1` closes the pipe after one line; the next write fails with
EPIPE (Python ignores SIGPIPE, so it is a BrokenPipeError). That is the reader's choice, not
an error of ours: the output stops, and no traceback follows. The descriptor is pointed at
/dev/null so that the flush at interpreter exit does not fail a second time ("Exception
ignored ... BrokenPipeError", exit code 120).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TextIO


def _reader_gone(stream: TextIO) -> None:
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def say(text: str, stream: TextIO | None = None) -> bool:
    """Print one line (or block) and flush; False when nobody reads `stream` any more."""
    out = sys.stdout if stream is None else stream
    try:
        print(text, file=out, flush=True)
    except BrokenPipeError:
        _reader_gone(out)
        return False
    return True


def flush() -> None:
    """Flush stdout and stderr now (argparse's --help text is still buffered), so a reader
    that went away is noticed here and not at interpreter exit."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            _reader_gone(stream)
        except (OSError, ValueError):
            pass


def reader_gone() -> None:
    """A BrokenPipeError reached the top: stdout is the stream whose reader went away."""
    _reader_gone(sys.stdout)
