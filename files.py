"""Atomic file writes: a crash, `kill -9` or a full disk at any moment leaves the previous version of a file
intact. A shared leaf that imports nothing of ours; the entry scripts show a WriteError as one line."""

import os
from pathlib import Path


class WriteError(Exception):
    """A file could not be written (a full disk, a vanished or read-only folder); earlier files are intact."""


def write_atomically(path, write):
    """Call write(f) on a temporary file in the same folder, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(f"could not write {path}: {e.strerror or e}; earlier files there are intact") from None
        raise
    sync_folder(path.parent)


def sync_folder(folder):
    """Make the renames into `folder` durable (where the system can)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomically(path, text):
    write_atomically(path, lambda f: f.write(text.encode()))


def write_csv_atomically(path, header, rows):
    """A CSV of `rows` (dicts) with the columns `header`, in that order; missing keys are empty cells."""
    lines = [",".join(csv_field(row.get(c)) for c in header) for row in [dict(zip(header, header)), *rows]]
    write_text_atomically(path, "\n".join(lines) + "\n")


def csv_field(value):
    """A CSV cell; None and NaN (a score that is undefined here, such as the AUC of an absent class) are empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def move_into_place(paths, folder):
    """Move finished files (each fsynced first) into `folder`, in the order given: a reader sees each file
    either as it was or complete."""
    try:
        for path in paths:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(path, Path(folder) / Path(path).name)
        sync_folder(folder)
    except OSError as e:
        raise WriteError(f"could not write into {folder}: {e.strerror or e}") from None
