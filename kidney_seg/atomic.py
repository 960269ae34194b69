"""Atomic output files: a temporary file beside the target, renamed into place on success.

Every output of the pipeline is written through :func:`atomic_path`, so a killed job or a
full disk never leaves a half-written file; errors name the final path and keep the errno.
Small readers of the files written here (JSON, .npy) live beside their writers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputWriteError(OSError):
    """An output file could not be written (disk full, quota, read-only file system...).

    The message names the final output path; ``errno`` and ``strerror`` are the original
    error's, ``filename`` is the final path and ``__cause__`` the original exception. An
    instance is also an instance of the original error's class (e.g. ``PermissionError``),
    so existing ``except`` clauses keep working.
    """

    def __init__(self, path: str | os.PathLike, cause: OSError, stage: str = "writing"):
        super().__init__(cause.errno, cause.strerror or str(cause), os.fspath(path))
        self.path = Path(path)
        self.cause = cause
        self.stage = stage

    def __reduce__(self):  # picklable (e.g. across worker processes), dynamic subclasses included
        base = type(self.cause)
        return _rebuild_write_error, (base, self.filename, self.errno, self.strerror, self.stage)

    def __str__(self) -> str:
        code = f"[Errno {self.errno}] " if self.errno is not None else ""
        detail = f"{code}{self.strerror}"
        other = getattr(self.cause, "filename", None)
        if other is not None and not Path(os.fspath(other)).name.startswith(f".{self.path.name}."):
            detail += f" ({os.fspath(other)})"  # the error concerns another file, e.g. a copy's source
        return f"cannot write {self.filename}: {detail} (while {self.stage}; the file was left unchanged)"


_ERROR_TYPES: dict[type, type] = {}


def _write_error(path: Path, cause: OSError, stage: str) -> OutputWriteError:
    """An :class:`OutputWriteError` that is also of ``cause``'s own OSError subclass."""
    base = type(cause)
    if base is OSError or issubclass(base, OutputWriteError):
        cls: type = OutputWriteError
    else:
        cls = _ERROR_TYPES.get(base)
        if cls is None:
            try:
                cls = type(f"OutputWriteError_{base.__name__}", (OutputWriteError, base), {"__module__": __name__})
            except TypeError:  # an OSError subclass that cannot be combined
                cls = OutputWriteError
            _ERROR_TYPES[base] = cls
    try:
        return cls(path, cause, stage)
    except Exception:  # an odd subclass constructor: fall back to the plain class
        return OutputWriteError(path, cause, stage)


def _rebuild_write_error(
    base: type, path: str, errno_: int | None, strerror: str | None, stage: str
) -> OutputWriteError:
    """Unpickle an :class:`OutputWriteError`."""
    try:
        cause = base(errno_, strerror) if errno_ is not None else base(strerror)
    except Exception:
        cause = OSError(errno_, strerror)
    return _write_error(Path(path), cause, stage)


def _short_write_cause(exc: OSError, folder: Path) -> OSError | None:
    """ENOSPC for an errno-less error on a full file system, else None.

    Some writers report a short write without an errno (numpy's ``tofile``, behind
    ``np.save``: "262144 requested and 131040 written"); on a full disk the reason is
    ENOSPC. Checked before the temporary file is removed, while the space is still taken.
    """
    if exc.errno is not None:
        return None
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    if st.f_bavail and st.f_bfree:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write: {exc})")


def _fsync_file(path: Path) -> None:
    """Flush a written file's data to the device (errors such as a deferred ENOSPC surface here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; best effort (some file systems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success.

    The temporary file is hidden (``.<name>.<random><suffixes>``), lives in the final
    folder (so the rename is atomic) and is removed whatever goes wrong: the final path
    never holds a partial file, and an existing file there keeps its complete previous
    content until the new one replaces it. On success the data is fsync'ed before the
    rename (``fsync=False`` skips it, e.g. for scratch files). An :class:`OSError` while
    creating, writing, flushing or renaming (disk full, quota, read-only file system)
    becomes an :class:`OutputWriteError` naming ``path``, chained to the original and
    keeping its errno. Other exceptions pass through unchanged.
    """
    final = Path(path)
    stage = "creating a temporary file beside it"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(final.suffixes) or ".tmp"
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(final, exc, stage) from exc
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        stage = "writing"
        yield tmp_path
        if fsync:
            stage = "flushing to disk"
            _fsync_file(tmp_path)
        stage = "renaming into place"
        os.replace(tmp_path, final)
    except BaseException as exc:
        cause = _short_write_cause(exc, final.parent) if isinstance(exc, OSError) else None
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise _write_error(final, cause or exc, stage) from exc
        raise
    if fsync:
        _fsync_dir(final.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON atomically (sorted keys, so reruns give identical bytes)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a NumPy array atomically in .npy format (memory-mappable, no pickle)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Load a .npy array without pickle, memory-mapped by default; an object (pickled) array is refused, naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:  # numpy's message names neither the file nor the reason for refusing
        raise ValueError(f"{os.fspath(path)}: refused: {exc} (pickled object arrays are never loaded)") from exc


def read_json(path: str | os.PathLike | None) -> dict | None:
    """A JSON file as a dict, or None when no path is given."""
    if not path:
        return None
    return json.loads(Path(path).read_text())
