"""Test-side fault injection: hold one checkpoint save between its files and its marker.

Put this folder first on a training subprocess's ``PYTHONPATH`` with ``HOLD_SAVE_STEP=N``:
Python imports ``sitecustomize`` at start-up in every process of the launch (the launcher and
each worker), and this one wraps the checkpoint module's ``write_complete_marker`` as soon as
that module is imported, so that the save of step N sleeps up to ``HOLD_SECONDS`` after every
rank wrote its files and before the ``COMPLETE`` marker. A test can then SIGKILL a real
training process in the middle of a save. Shipped code has no hook for this.
"""
import importlib.abc
import os
import sys
import time

TARGET = "clicktower.launcher.engine.checkpoint"
HOLD_SECONDS = 120.0


def hold_env(step: int, env: dict) -> dict:
    """``env`` plus what makes a launched run hold its step-``step`` save.

    Args:
        step: the step whose save is held.
        env: the subprocess environment to extend.
    """
    path = os.path.dirname(os.path.abspath(__file__))
    rest = env.get("PYTHONPATH")
    return {**env, "HOLD_SAVE_STEP": str(step), "PYTHONPATH": path + (os.pathsep + rest if rest else "")}


def _patch(module) -> None:
    real = module.write_complete_marker
    step_to_hold = int(os.environ["HOLD_SAVE_STEP"])

    def held(folder, step):
        if step == step_to_hold:
            time.sleep(HOLD_SECONDS)  # the files are there, the marker is not yet
        real(folder, step)

    module.write_complete_marker = held


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the checkpoint module through the other finders and patches it once executed."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("HOLD_SAVE_STEP", "").isdigit():
    sys.meta_path.insert(0, _PatchOnImport())
