"""Keep the repository root from shadowing real packages.

The code folders ``kernels/``, ``data/``, ``modeling/`` and ``launcher/`` sit at the top of the
repository and install as ``clicktower.<folder>``. But ``python -m ...``, ``python -m pytest``
and ``accelerate launch -m ...`` started from the root put the root on ``sys.path``, where each
folder is also importable under its bare name, ahead of the PyPI package of that name
(transformers >= 5.25 imports Hugging Face's ``kernels``). Each folder's ``__init__`` therefore
calls :func:`step_aside` when it is imported under its bare name: the name goes to the
installed package, or, if there is none, fails as if this repository were not on the path.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def step_aside(name: str, folder: str) -> None:
    """Bind ``sys.modules[name]`` to the package of that name installed elsewhere.

    Called from a code folder's ``__init__`` while Python imports it as ``name``. The import
    system returns whatever ``sys.modules[name]`` holds once that ``__init__`` has run, so the
    caller gets the installed package; the caller must run none of its own body afterwards.

    Args:
        name: the bare name being imported (``"kernels"``).
        folder: the repository folder that was found for it (its ``__path__[0]``).

    Raises:
        ModuleNotFoundError: no package of that name is installed outside the repository.
    """
    spec = _find_elsewhere(name, os.path.realpath(folder))
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {folder} is clicktower.{name}, not {name!r})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _find_elsewhere(name: str, folder: str) -> importlib.machinery.ModuleSpec | None:
    """The spec the meta-path finders give ``name`` with ``folder``'s parent off ``sys.path``."""
    root = os.path.dirname(folder)
    path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, path)
        else:  # editable installs and other custom finders: they do not search sys.path
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, None) if find_spec is not None else None
        if spec is not None and not _inside(spec, folder):
            return spec
    return None


def _inside(spec: importlib.machinery.ModuleSpec, folder: str) -> bool:
    # Only this folder is refused: the root itself may hold the installed package (a .venv).
    places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    return any(os.path.realpath(p).startswith(folder + os.sep) for p in places if p and os.path.isabs(p))
