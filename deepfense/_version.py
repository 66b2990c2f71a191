"""The installed version of deepfense-losses, from its distribution metadata.

`deepfense` is an implicit namespace package shared with the DeepFense framework, so it has no `__init__.py` and no
`deepfense.__version__`; ask `deepfense._version.version()` (or `importlib.metadata.version('deepfense-losses')`).
"""

from __future__ import annotations

import re
from pathlib import Path

DISTRIBUTION = "deepfense-losses"


def version() -> str:
    """The installed distribution's version; from a source tree that is not installed, setup.py's + '+source'."""
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        dist = None
    if dist is not None and _same_tree(dist):
        return dist.version
    setup = Path(__file__).resolve().parent.parent / "setup.py"
    found = re.search(r'version="([^"]+)"', setup.read_text(encoding="utf-8")) if setup.is_file() else None
    if found:
        return f"{found.group(1)}+source"
    return dist.version if dist is not None else "unknown"


def _same_tree(dist) -> bool:
    """Whether the installed distribution is the code running now (not, say, an install of another checkout)."""
    here = Path(__file__).resolve()
    try:
        return any(Path(dist.locate_file(f)).resolve() == here for f in dist.files or [] if f.name == "_version.py")
    except Exception:  # noqa: BLE001 - odd metadata (an editable finder): trust the metadata
        return True
