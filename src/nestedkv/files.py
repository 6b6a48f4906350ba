"""Files the user names (a context, a data file, an output path): every refusal names the file.

The command line prints these ``ValueError`` messages as they are (one line, exit code 2), so they
say which file and what is wrong with it, never just ``[Errno 2]`` or a decoder's byte offsets.
"""

from __future__ import annotations

from pathlib import Path


def file_error(path: str | Path, what: str, error: OSError | UnicodeDecodeError) -> ValueError:
    """A one-line ``ValueError`` saying why the ``what`` at ``path`` cannot be read."""
    if isinstance(error, UnicodeDecodeError):
        reason = f"not UTF-8 text (byte {error.start} is {error.object[error.start:error.start + 1]!r})"
    elif isinstance(error, FileNotFoundError):
        reason = "no such file"
    elif isinstance(error, IsADirectoryError):
        reason = "it is a directory"
    else:
        reason = error.strerror or str(error)
    return ValueError(f"cannot read {what} {path}: {reason}")


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``; a ``ValueError`` naming the ``what`` and the file if it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise file_error(path, what, error) from None


def check_readable(path: str | Path, what: str) -> Path:
    """``path`` if it is a file that can be opened (for files another library parses, so that a missing
    or unreadable one is named before that library's own error); else a ``ValueError``."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise file_error(path, what, error) from None
    return Path(path)


def check_output_dir(path: str | Path, what: str) -> Path:
    """``path`` if it is a directory or can become one (it is created later); else a ``ValueError``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a directory")
    return path


def check_new_file(path: str | Path, what: str) -> Path:
    """``path`` if a new file can be written there: an existing file is refused rather than overwritten
    (it may hold an earlier measurement), and so is a path whose directory does not exist."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    if path.exists():
        raise ValueError(f"{what} {path} already exists; remove it or choose another name")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {what} {path}: no directory {path.parent}")
    return path
