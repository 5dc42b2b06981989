"""Writing keys and certificates: always as new files, never through a link.

A private key written over an existing file would keep that file's (maybe wider)
permissions, and one written through a symbolic link would land wherever the link
points, so every key and certificate fedbits writes is created afresh with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and its final mode (0600 for a private key). An
existing file is replaced only when the caller says so (a command's ``--force``),
by removing it first; a symbolic link is refused even then.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedbits.errors import FedbitsError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def check_new(paths: list[Path], *, replace: bool, hint: str) -> None:
    """Raise, before anything is written, if any of ``paths`` is a symbolic link or not
    a regular file, or (unless ``replace``) already exists; ``hint`` says what to do
    about existing files. Checking the whole set first leaves an old set complete."""
    for path in paths:
        if path.is_symlink():
            raise FedbitsError(f"{path} is a symbolic link: fedbits writes keys and "
                               "certificates only as files of their own; remove the link "
                               "and run again")
        if path.exists() and not path.is_file():
            raise FedbitsError(f"{path} exists and is not a file: remove it or choose "
                               "another directory")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not replace:
        shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more"
                                           if len(existing) > 4 else "")
        raise FedbitsError(f"{shown} already exist{'s' if len(existing) == 1 else ''}: {hint}")


def write_new(path: Path, data: bytes, *, private: bool, replace: bool = False) -> None:
    """Write ``data`` to ``path`` as a new file: mode 0600 if ``private`` (its parent,
    if created, 0700), else 0644; an existing file is removed first only if
    ``replace``; a symbolic link is always refused."""
    check_new([path], replace=replace, hint="not replaced (pass --force to replace it)")
    path.parent.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, PRIVATE_MODE if private else PUBLIC_MODE)
    except FileExistsError:  # made (a file or a link) between the check and now
        raise FedbitsError(f"{path} appeared while fedbits was writing it: not "
                           "replaced; check who else writes there and run again") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
