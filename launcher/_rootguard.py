"""Keep a clicktower checkout on ``sys.path`` from shadowing real packages.

The code folders ``kernels/``, ``data/``, ``modeling/`` and ``launcher/`` sit at the top of the
repository and install as ``clicktower.<folder>``. ``python -m ...``, ``python -c``, ``python -m
pytest`` and ``accelerate launch -m ...`` started from the root put the root first on
``sys.path``, where the import system would find each folder under its bare name ahead of the
PyPI package of that name (transformers >= 5.25 imports Hugging Face's ``kernels``).

setup.py installs this file as the top-level module ``_clicktower_rootguard`` plus a ``.pth``
line that calls :func:`install` at interpreter start, before Python adds the working directory
to ``sys.path``. It adds a path hook: the finder of a clicktower checkout's root never sees the
four folders, so ``find_spec("kernels")`` gives the installed package and ``find_spec("data")``
gives None, exactly as if the checkout were not on the path. Nothing else changes.
"""
from __future__ import annotations

import os
import sys

FOLDERS = frozenset({"kernels", "data", "modeling", "launcher"})
# What makes a sys.path entry a clicktower checkout: this very file in its launcher/ folder.
MARKER = os.path.join("launcher", "_rootguard.py")


class CheckoutRootFinder:
    """The path-entry finder of a checkout root: the default one, minus the code folders.

    Args:
        inner: the finder the other path hooks give this entry (a ``FileFinder``).
    """

    def __init__(self, inner):
        self.inner = inner
        self.path = getattr(inner, "path", None)

    def find_spec(self, fullname, target=None):
        """None for a code folder's bare name; otherwise whatever the default finder says."""
        if fullname in FOLDERS:
            return None
        return self.inner.find_spec(fullname, target)

    def invalidate_caches(self):
        """Forward to the default finder (``importlib.invalidate_caches``)."""
        invalidate = getattr(self.inner, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()

    def iter_modules(self, prefix=""):
        """``pkgutil.iter_modules`` over the root, without the code folders."""
        import pkgutil  # only listings need it; this module loads at every interpreter start

        for name, ispkg in pkgutil.iter_importer_modules(self.inner, prefix):
            if name[len(prefix):] not in FOLDERS:
                yield name, ispkg


def is_checkout(path: str) -> bool:
    """Whether ``path`` (a sys.path entry; ``""`` is the working directory) is a checkout root.

    Args:
        path: the sys.path entry.
    """
    return os.path.isfile(os.path.join(path or os.curdir, MARKER))


def checkout_hook(path: str):
    """The path hook: a :class:`CheckoutRootFinder` for a checkout root, ImportError otherwise.

    Args:
        path: the sys.path entry the import system asks about.

    Raises:
        ImportError: not a checkout root (the import system then asks the next hook).
    """
    if not is_checkout(path):
        raise ImportError("not a clicktower checkout")
    for hook in sys.path_hooks:
        if hook is checkout_hook:
            continue
        try:
            return CheckoutRootFinder(hook(path))
        except ImportError:
            continue
    raise ImportError("no finder for this path entry")


def install() -> None:
    """Put :func:`checkout_hook` first among the path hooks (idempotent)."""
    if checkout_hook in sys.path_hooks:
        return
    sys.path_hooks.insert(0, checkout_hook)
    # Entries already scanned (PYTHONPATH=. for instance) keep their finder otherwise.
    for entry in [e for e in sys.path_importer_cache if isinstance(e, str) and is_checkout(e)]:
        del sys.path_importer_cache[entry]
