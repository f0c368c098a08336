"""bitsandbytes is imported without fetching kernels from the Hub: importing rlhf-kit never opens a connection.

bitsandbytes (0.50) on a CPU with AVX512-BF16 calls `kernels.get_kernel("kernels-community/quantization-bitsandbytes")`
while it is being imported, whenever the `kernels` package is installed, and transformers 5.25 requires `kernels`.
Since transformers imports bitsandbytes as soon as it is imported itself, every process that touches transformers
asked the Hub for a publisher check and could download and load compiled code nobody asked for (the run on local
files in tests/test_bad_inputs.py caught it). rlhf-kit is offline unless asked, so bitsandbytes is imported with
the Hub in offline mode: a kernel already in the local cache is still used, none is downloaded, and bitsandbytes
otherwise keeps its built-in CPU path (only 4-bit matmuls on CPU are concerned; GPUs never use this kernel).
The two log lines bitsandbytes and kernels print about the missing kernel are kept off the console.

`import rlhf_kit` installs the import hook, which costs nothing until bitsandbytes is imported; it must come before
transformers, trl or peft are imported (the recipes import rlhf_kit first for this reason).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from contextlib import contextmanager

_GUARDED = "bitsandbytes"
_QUIET_LOGGERS = ("bitsandbytes", "kernels")


@contextmanager
def hub_offline_and_quiet():
    """The Hub in offline mode, and bitsandbytes' and kernels' warnings silenced, for the duration of the block."""
    from huggingface_hub import constants

    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # kernels reads this at call time: local cache only, no publisher check online
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _OfflineLoader(importlib.abc.Loader):
    """Runs the real loader of bitsandbytes' package module (which imports its backends) inside the guard."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with hub_offline_and_quiet():
            self.loader.exec_module(module)

    def __getattr__(self, name):  # resources, get_data, is_package...: the real loader's
        return getattr(self.loader, name)


class OfflineBitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as the other finders do, then hands its import to `_OfflineLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _GUARDED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


def install() -> bool:
    """Guard the next import of bitsandbytes; False when it is already imported (too late to guard) or guarded."""
    if _GUARDED in sys.modules or any(isinstance(f, OfflineBitsandbytesFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, OfflineBitsandbytesFinder())
    return True
