"""Where rlhf-kit's shipped files are: the recipes, their configs, the accelerate profiles and the demo task's data.

A checkout (and an editable install of it) has them at the repository root. A wheel carries a copy inside the
package, in rlhf_kit/shipped/ (setup.py copies SHIPPED there when it builds one), because a wheel can only install
files that sit in a package. Every path relative to the working directory in a config (`data/sft`,
`accelerate_config.yaml`, `recipes/configs/sft/tiny.yaml`) keeps meaning exactly that: an installed rlhf-kit never
reads a config or data file from its own copy behind the user's back. `rlhf-kit init` copies the shipped files into
a directory, and a command given a shipped path that the working directory lacks says so.

Standard library only: setup.py runs this file to know what to copy, before rlhf-kit's dependencies are installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# What a wheel ships besides the package, relative to the repository root: the recipes launch the stages, and the
# tiny configs, the accelerate profiles and the data are what the README's commands name.
SHIPPED = ("recipes", "accelerate_config.yaml", "accelerate_configs", "data")

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED = _PACKAGE / "shipped"
ROOT = _INSTALLED if _INSTALLED.is_dir() else _PACKAGE.parent
RECIPES = ROOT / "recipes"
DEFAULT_ACCELERATE_CONFIG = ROOT / "accelerate_config.yaml"


def recipe_path(recipe: str) -> Path:
    """The file of a recipe (`sft` -> recipes/sft.py): the one every launch runs, whatever the working directory."""
    return RECIPES / f"{recipe}.py"


def missing_shipped_file(path: str | Path) -> str:
    """For a relative path that the working directory lacks but rlhf-kit ships (a run from outside the checkout),
    the sentence that says how to get it; "" otherwise."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (ROOT / path).exists():
        return ""
    return (f" {path} is one of rlhf-kit's shipped files, and relative paths are read from the working directory "
            f"({Path.cwd()}): run `rlhf-kit init` there to copy the shipped configs, accelerate profiles and data "
            f"from {ROOT}, then run this command again.")


def copy_shipped(target: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy SHIPPED from the installed package into `target`, laid out as in a checkout, so the README's commands
    run there; returns the copied files. Raises FileExistsError naming the files that would be overwritten, unless
    `overwrite`."""
    target = Path(target)
    if target.resolve() == ROOT.resolve():
        raise FileExistsError(f"{target} is where rlhf-kit's shipped files already are ({ROOT}); nothing to copy.")
    files = [(source, target / source.relative_to(ROOT)) for source in shipped_files(ROOT)]
    existing = [str(dest) for _, dest in files if dest.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise FileExistsError(f"{len(existing)} file(s) would be overwritten: {shown}. `rlhf-kit init --force` "
                              "overwrites them; or copy into another directory.")
    for source, dest in files:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    return [dest for _, dest in files]


def shipped_files(root: Path) -> list[Path]:
    """The files of SHIPPED under `root` (a checkout or an installed copy), without the caches a checkout builds in
    place: Python's byte-code and the retrieval index beside a corpus (`<corpus>.rlhf-kit-index/`, or
    `.rlhf-kit-index/` in a corpus directory: rlhf_kit.inference.retrieval.INDEX_SUFFIX), which is rebuilt on use."""
    files = []
    for name in SHIPPED:
        path = root / name
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            cached = "__pycache__" in file.parts or any(part.endswith(".rlhf-kit-index") for part in file.parts)
            if file.is_file() and not cached and file.suffix != ".pyc":
                files.append(file)
    return files
