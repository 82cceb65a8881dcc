"""pip's input for the container, from the project's one source: pyproject.toml's runtime dependencies (with
the `container` extra and the build backend) at constraints.txt's exact versions.

    python runtime_requirements.py PYPROJECT CONSTRAINTS OUT_DIR
        -> OUT_DIR/requirements.txt, OUT_DIR/constraints.txt

The Dockerfile runs it in the base image, tools/container/build_base.sh in the stand-in base it builds. When
the interpreter running it already has torch (the PyTorch base image), the CUDA stack is the base's: the
lines of torch, torchvision, triton and the nvidia-* / cuda-* wheels are dropped from the constraints, and
torch and torchvision pinned at the installed versions, so that no requirement pulls a second multi-GB
torch. Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

CUDA_STACK = re.compile(r"^\s*(torch|torchvision|triton|nvidia-[\w.-]+|cuda-[\w.-]+)\s*==", re.IGNORECASE)
KEPT = ("torch", "torchvision")


def requirements(pyproject: Path) -> list[str]:
    data = tomllib.loads(Path(pyproject).read_text())
    project = data["project"]
    return project["dependencies"] + project["optional-dependencies"]["container"] + data["build-system"]["requires"]


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pinned(lines: list[str], name: str) -> str | None:
    pattern = re.compile(rf"^\s*{re.escape(name)}\s*==\s*(\S+)", re.IGNORECASE)
    return next((match.group(1) for line in lines if (match := pattern.match(line))), None)


def constraints(lines: list[str]) -> list[str]:
    """constraints.txt's lines, with the installed CUDA stack kept as it is (see the module doc)."""
    if installed("torch") is None:
        return lines
    kept = [line for line in lines if not CUDA_STACK.match(line)]
    for name in KEPT:
        have, want = installed(name), pinned(lines, name)
        if have is None:
            continue
        print(f"base image provides {name}=={have} (constraints.txt: {want or 'unpinned'})")
        if want is not None and have.split("+")[0] != want.split("+")[0]:
            print(f"WARNING: {name} of the base image differs from constraints.txt")
        kept.append(f"{name}=={have}")
    return kept


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    pyproject, constraints_file, out = map(Path, argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "requirements.txt").write_text("\n".join(requirements(pyproject)) + "\n")
    (out / "constraints.txt").write_text("\n".join(constraints(constraints_file.read_text().splitlines())) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
