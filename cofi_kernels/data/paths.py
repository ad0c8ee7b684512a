"""The one check of every path a run reads or writes: data files, model directories, output directories.

Each check runs before anything is read, loaded or written, and raises the
error class its caller names (:class:`~cofi_kernels.data.text.DataError`
for data files, :class:`~cofi_kernels.training.trainer.RunError` for model and
output directories) with a message that says what the path is and what to do.
The ``cofi`` command runs them on every path argument first; the library runs
the same checks where it opens the path, so Python callers get the same messages.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["check_input_file", "check_model_dir", "check_output_dir", "check_output_file", "describe_kind"]


def describe_kind(path: str) -> str:
    """What sits at ``path``: ``"a directory"``, ``"a FIFO (named pipe)"``, ``"a socket"``, ``"a device"``,
    ``"a file"``, or, for a symbolic link that leads nowhere, ``"a symbolic link loop"`` /
    ``"a dangling symbolic link (to '...')"`` (``OSError`` when nothing is there)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if not os.path.islink(path):
            raise
        # Said as what it is: a link that cannot be followed would otherwise read as "does not exist".
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"a dangling symbolic link (to {os.readlink(path)!r})"
        raise
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a file"


def _nonempty(path, what: str, error: type[Exception]) -> str:
    if path is None or os.fspath(path) == "":
        raise error(f"the {what} path is empty; give a path")
    path = os.fspath(path)
    if "\0" in path:
        raise error(f"the {what} path {path!r} contains a NUL character")
    return path


def check_input_file(path, what: str, error: type[Exception]) -> str:
    """``path`` is an existing, readable regular file; returns it as ``str``.

    Args:
        what: how messages name it (``"data file"``).
        error: the exception class raised.
    """
    path = _nonempty(path, what, error)
    if not os.path.lexists(path):  # lexists: a link that leads nowhere is described below, not "missing"
        raise error(f"{what} {path!r} does not exist")
    kind = describe_kind(path)
    if kind != "a file":
        raise error(f"{what} {path!r} is {kind}, not a regular file; give a file")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path!r} is not readable (permission denied)")
    return path


def check_model_dir(path, what: str, error: type[Exception], files=()) -> str:
    """``path`` is an existing directory whose files can be listed and read; returns it as ``str``.

    Args:
        what: how messages name it (``"model directory"``, ``"--teacher"``).
        error: the exception class raised.
        files: names of files the directory may hold; whatever sits under one of them must be a
            regular file (a FIFO would block its reader; a directory, a link loop or a dangling
            link would read as a missing file).
    """
    path = _nonempty(path, what, error)
    if not os.path.lexists(path):
        raise error(f"{what} {path!r} does not exist")
    kind = describe_kind(path)
    if kind != "a directory":
        raise error(f"{what} {path!r} is {kind}, not a directory; give the directory a model was saved to")
    if not os.access(path, os.R_OK | os.X_OK):
        raise error(f"{what} {path!r} is not readable (permission denied)")
    for name in files:
        inner = os.path.join(path, name)
        if os.path.lexists(inner) and (found := describe_kind(inner)) != "a file":
            raise error(f"{what} {path!r}: {name} is {found}, not a regular file")
    return path


def _writable_existing(path: str, kind: str, hint: str, mode: int, what: str, error: type[Exception],
                       noun: str | None = None) -> str:
    """An existing ``path`` is of ``kind`` (:func:`describe_kind`'s words) and allows ``mode`` access."""
    found = describe_kind(path)
    if found != kind:
        raise error(f"{what} {path!r} is {found}, not {noun or kind}; {hint}")
    if not os.access(path, mode):
        raise error(f"{what} {path!r} is not writable (permission denied)")
    return path


def check_output_dir(path, what: str, error: type[Exception]) -> str:
    """``path`` is a directory that exists or can be created, and can be written; returns it as ``str``.

    Whether an existing directory may be used (empty, or an unfinished run to
    resume) is the run's decision, not this check's.

    Args:
        what: how messages name it (``"--out"``).
        error: the exception class raised.
    """
    path = _nonempty(path, what, error)
    if os.path.exists(path):
        return _writable_existing(path, "a directory", "give a new or empty directory", os.W_OK | os.X_OK, what, error)
    # The nearest existing ancestor decides whether the directory can be created.
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise error(f"{what} {path!r} cannot be created: {parent!r} is {describe_kind(parent)}, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{what} {path!r} cannot be created: {parent!r} is not writable (permission denied)")
    return path


def check_output_file(path, what: str, error: type[Exception]) -> str:
    """``path`` names a file that can be written (created, or replaced when it exists); returns it as ``str``.

    Its directory must exist and be writable (the file is written next to it
    and renamed into place); an existing ``path`` must be a writable regular
    file, not a directory, FIFO or device.

    Args:
        what: how messages name it (``"--out"``).
        error: the exception class raised.
    """
    path = _nonempty(path, what, error)
    if os.path.exists(path):
        _writable_existing(path, "a file", "give the path of a file to write", os.W_OK, what, error,
                           noun="a regular file")
    elif path.endswith(("/", os.sep)):
        raise error(f"{what} {path!r} ends with a path separator, so it names a directory; give the path of a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        raise error(f"{what} {path!r} cannot be written: its directory {parent!r} does not exist; create it first")
    if not os.path.isdir(parent):
        raise error(f"{what} {path!r} cannot be written: {parent!r} is {describe_kind(parent)}, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{what} {path!r} cannot be written: its directory {parent!r} is not writable (permission denied)")
    return path
