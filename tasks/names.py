"""Names that become paths: model names, aliases and versions. Anything else is refused before it
reaches the filesystem (no '..', no '/', no leading '.')."""

from __future__ import annotations

import re

from tasks.config import NAME
from tasks.errors import InputError


class BadName(InputError):
    """A model name, alias or version that may not become a path."""


def check_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME, name) or ".." in name:
        raise BadName(f"{what} {name!r} is not allowed: letters, digits, '_', '.', '-' only, "
                          "not starting with '.', at most 64 characters (it becomes a directory name)")
    return name


def check_version(version: int | str) -> int:
    text = str(version)
    if not re.fullmatch(r"[1-9][0-9]{0,8}", text):
        raise BadName(f"model version {version!r} is not allowed: a positive integer is expected")
    return int(text)
