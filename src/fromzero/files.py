"""Temporary files and directories for atomic writes, with the permissions of normal ones.

Every output of fromzero (checkpoints, run files, converted models, exports) is written into a
temporary file or directory next to its destination and renamed into place once complete, so
a crash never leaves half of it behind. ``tempfile.mkstemp`` / ``mkdtemp`` create those private
(0600 / 0700) whatever the umask; renamed into place they would stay private, and other users
of a shared machine could not read a run or a checkpoint. These helpers give them the mode a
plain ``open()`` / ``mkdir()`` would have under the current umask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir_beside(target: Path, prefix: str) -> Path:
    """A new empty directory in ``target``'s parent, mode 0777 & ~umask, like ``mkdir``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=Path(target).parent))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def temp_file_beside(target: Path, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, path) of a new empty file in ``target``'s parent, mode 0666 & ~umask, like ``open``."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=Path(target).parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, name
