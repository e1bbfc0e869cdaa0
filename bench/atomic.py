"""Writing a file so that readers see the old version or the new one, never half of one.

The new content goes to a unique sibling, is flushed to disk, then renamed over the target
(a rename within one directory is atomic on POSIX). The sibling is created with the
umask's permissions, not ``tempfile.mkstemp``'s 0600, so records and caches in a shared
results folder stay readable by the rest of the team.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def temporary_twin(final: Path) -> Path:
    """A unique, hidden sibling of ``final`` to write before renaming it onto ``final``."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_twin(path)
    try:
        with open(tmp, "x") as f:  # "x": fails rather than share a sibling with a writer
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
