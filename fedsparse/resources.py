"""Files shipped inside the package (the CIFAR-10 sample, bundled weights), found wherever
the running code came from.

Flower's ``flwr run`` ships an app's *code* as a FAB (Python, TOML, Markdown and JSON files
only) and imports it from the FAB's install folder, so the binary assets must be looked up
beside the installed fedsparse distribution as well as beside this module.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

PACKAGE_ASSETS = Path(__file__).resolve().parent / "assets"


def _candidates(name: str) -> list[Path]:
    rel = Path("fedsparse") / "assets" / name
    found = [PACKAGE_ASSETS / name]
    found += [Path(entry) / rel for entry in sys.path if entry]
    try:
        dist = metadata.distribution("fedsparse")
    except metadata.PackageNotFoundError:
        return found
    found.append(Path(str(dist.locate_file(rel))))
    direct_url = dist.read_text("direct_url.json")  # editable installs point at the source tree
    if direct_url:
        url = json.loads(direct_url).get("url", "")
        if url.startswith("file://"):
            found.append(Path(unquote(urlparse(url).path)) / rel)
    return found


@lru_cache(maxsize=None)
def asset_path(name: str) -> Path:
    """The path of a bundled asset, or ``FileNotFoundError`` saying how to get it."""
    for path in _candidates(name):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"bundled file {name} not found next to the fedsparse code or the installed package; "
        "install fedsparse on this machine (pip install -e <fedsparse checkout>)"
    )
