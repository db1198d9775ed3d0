"""Writing outputs safely: private directories and all-or-nothing files.

Chat logs are personal data, so every directory we create is 0700 and every file
0600; every output appears under its final name only once it is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import InputError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_dir(path: str | Path) -> Path:
    """Create `path` (and parents) if needed and make it readable by the owner only."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it over `final` only if the block succeeds,
    its contents synced first and the rename after (a power cut leaves the old file or the new)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp_name, PRIVATE_FILE_MODE)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a private temp directory beside `final`; it replaces `final` only on success, every
    file in it synced first and the rename after."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, PRIVATE_DIR_MODE)
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def fsync_file(path: str | Path) -> None:
    """Flush a file's contents to the disk (a link or something not a regular file is left alone)."""
    if Path(path).is_symlink() or not Path(path).is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """`fsync_file` every file under `root`, then every directory, deepest first."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole text file atomically and durably (UTF-8, mode 0600).

    Temp file, fsync, rename, fsync of the directory: after a power cut the file holds either
    the old text or the new one, never an empty or half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new name inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (certain network and FUSE mounts) cannot sync a directory.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------- a full disk

# Free space below which a failed write is taken to mean "the disk is full" (see below).
LOW_SPACE_BYTES = 64 * 2**20


def is_disk_full(exc: BaseException, where: str | Path) -> bool:
    """True when `exc`, raised while writing under `where`, means the disk (or quota) is full.

    Libraries say so differently: Python raises OSError with errno 28; safetensors a
    SafetensorError ending "No space left on device (os error 28)"; `torch.save` a bare
    RuntimeError ("… unexpected pos 576 vs 534") that names no cause, so for that one the
    free space left under `where` decides.
    """
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    return isinstance(exc, RuntimeError) and "unexpected pos" in text and free_bytes(where) < LOW_SPACE_BYTES


def free_bytes(where: str | Path) -> int:
    """Free bytes on the filesystem holding `where` (its nearest existing parent)."""
    path = Path(where).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return LOW_SPACE_BYTES * 2  # unknown: do not guess "full"


@contextlib.contextmanager
def disk_full_is_input_error(where: str | Path, consequence: str) -> Iterator[None]:
    """Turn a full disk while writing `where` into a one-line `InputError` saying `consequence`."""
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc, where):
            raise InputError(where, f"no space left on device; {consequence}") from None
        raise
