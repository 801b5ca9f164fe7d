"""Where datasets live on disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ENV_VAR = "ISOCONV_DATA"
DEFAULT_ROOT = "~/.cache/isoconv"


def resolve_data_root(data_dir: Optional[str] = None) -> Path:
    """`--data-dir` if given, else `$ISOCONV_DATA`, else `~/.cache/isoconv`."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_ROOT).expanduser()
