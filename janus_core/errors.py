"""Exceptions raised by janus_core: every message says what is wrong and what to do."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


class JanusError(ValueError):
    """Bad input or an unusable checkpoint; the message tells the user how to fix it."""


class CheckpointError(JanusError):
    """A model folder or weight file is missing, truncated or does not match the config."""


def file_error(exc: OSError, fallback: str) -> CheckpointError:
    """A :class:`CheckpointError` for an ``OSError`` met while reading or writing model files: the file (or
    ``fallback`` when the error names none), the system's reason and what to do about it."""
    name = exc.filename if exc.filename is not None else fallback
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = ("Give the user running ComfyUI / this program access to it (file and folder permissions, "
               "ownership), or use another folder.")
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free some disk space, or use a folder on another disk."
    elif exc.errno == errno.ENOENT:
        fix = "Check the path; a file missing from a checkpoint comes back by downloading the checkpoint again."
    elif exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        fix = "A file stands where a folder is expected (or the other way round): move it away."
    else:
        fix = "Check the disk and the path, then run again."
    return CheckpointError(f"{name}: {reason}. {fix}")


@contextmanager
def model_files(fallback: str) -> Iterator[None]:
    """Report an ``OSError`` raised inside the block (an unreadable checkpoint file or folder, a full disk) as
    :func:`file_error` does; ``fallback`` names the folder when the error names no file."""
    try:
        yield
    except OSError as exc:
        raise file_error(exc, fallback) from exc
