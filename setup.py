"""The one build step pyproject.toml cannot express: a wheel carries the recipes, configs, accelerate profiles and
data (rlhf_kit.resources.SHIPPED) in rlhf_kit/shipped/, where an installed rlhf-kit finds them.

They live at the repository root, where a checkout runs them, and a wheel installs only files inside a package, so
the build copies them in (a symlink would not survive a Windows checkout). An editable install copies nothing: its
package is the checkout's, and rlhf_kit.resources finds the files at the repository root.
"""

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# By path: rlhf_kit/__init__.py must not run before its dependencies are installed (resources.py needs none).
resources = runpy.run_path(str(ROOT / "rlhf_kit" / "resources.py"))
missing = [name for name in resources["SHIPPED"] if not (ROOT / name).exists()]
if missing:  # an sdist built without MANIFEST.in, say: fail rather than build a wheel that cannot run its commands
    raise FileNotFoundError(f"{missing} missing from {ROOT}: a wheel of rlhf-kit ships them (rlhf_kit/resources.py)")


class BuildWithShippedFiles(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        shipped = Path(self.build_lib, "rlhf_kit", "shipped")
        shutil.rmtree(shipped, ignore_errors=True)  # a file deleted since the last build must not stay in the wheel
        for source in resources["shipped_files"](ROOT):
            dest = shipped / source.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)


setup(cmdclass={"build_py": BuildWithShippedFiles})
