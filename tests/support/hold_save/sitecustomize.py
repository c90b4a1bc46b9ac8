"""Test-side fault injection: hold one checkpoint save between its files and its marker.

Put this folder first on a training subprocess's ``PYTHONPATH`` with ``HOLD_SAVE_STEP=N``:
Python imports ``sitecustomize`` at start-up in every process of the launch (the launcher and
each worker), and this one wraps ``write_complete_marker`` in the checkpointer's module
(``checkpoint.save``) as soon as that module is imported, so that the save of step N sleeps up
to ``HOLD_SECONDS`` after every rank wrote its files and before the ``COMPLETE`` marker. A test
can then SIGKILL a real training process in the middle of a save. Shipped code has no hook for this.

``HOLD_WRITE_STEP=N`` instead holds the background write of an async save
(``checkpoint.async_save``): ``Snapshot.write`` of step N writes every file, then sleeps before
it reports its digests, while the training thread goes on with the next steps.

``RECORD_CHECKS=FILE`` (with either, or alone) appends ``PID FOLDER`` to FILE for every
checkpoint folder a process verifies (``check_checkpoint``), to see which processes verify.
"""
import importlib.abc
import os
import sys
import time

HOLD_SECONDS = 120.0
# Module (patched as soon as it is executed) -> the variable that asks for its patch.
TARGETS = {"clicktower.launcher.engine.checkpoint.save": "HOLD_SAVE_STEP",
           "clicktower.launcher.engine.checkpoint.state": "HOLD_WRITE_STEP",
           "clicktower.launcher.engine.checkpoint.files": "RECORD_CHECKS"}


def hold_env(step: int | None, env: dict, variable: str = "HOLD_SAVE_STEP", record: str | None = None) -> dict:
    """``env`` plus what makes a launched run hold its step-``step`` save.

    Args:
        step: the step whose save is held (None: none).
        env: the subprocess environment to extend.
        variable: ``HOLD_SAVE_STEP`` (before the marker) or ``HOLD_WRITE_STEP`` (inside the
            background write of an async save).
        record: a file to append ``PID FOLDER`` to for every checkpoint verification.
    """
    path = os.path.dirname(os.path.abspath(__file__))
    rest = env.get("PYTHONPATH")
    extra = {variable: str(step)} if step is not None else {}
    if record is not None:
        extra["RECORD_CHECKS"] = record
    return {**env, **extra, "PYTHONPATH": path + (os.pathsep + rest if rest else "")}


def _patch_marker(module, step_to_hold: int) -> None:
    real = module.write_complete_marker

    def held(folder, step, *args, **kwargs):
        if step == step_to_hold:
            time.sleep(HOLD_SECONDS)  # the files are there, the marker is not yet
        real(folder, step, *args, **kwargs)

    module.write_complete_marker = held


def _patch_write(module, step_to_hold: int) -> None:
    real = module.Snapshot.write

    def held(self):
        digests = real(self)
        if self.folder.name == f".tmp-step_{step_to_hold:08d}":
            time.sleep(HOLD_SECONDS)  # this rank's files are on disk, not yet reported
        return digests

    module.Snapshot.write = held


def _patch_checks(module, record: str) -> None:
    real = module.check_checkpoint

    def recorded(folder, *args, **kwargs):
        with open(record, "a") as fh:
            fh.write(f"{os.getpid()} {folder}\n")
        return real(folder, *args, **kwargs)

    module.check_checkpoint = recorded


def _patch(module) -> None:
    variable = TARGETS[module.__name__]
    value = os.environ[variable]
    if variable == "RECORD_CHECKS":
        _patch_checks(module, value)
    elif variable == "HOLD_WRITE_STEP":
        _patch_write(module, int(value))
    else:
        _patch_marker(module, int(value))


def _wanted(name: str) -> bool:
    variable = TARGETS.get(name, "")
    value = os.environ.get(variable, "")
    return bool(value) if variable == "RECORD_CHECKS" else value.isdigit()


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds a target module through the other finders and patches it once executed."""

    def find_spec(self, name, path, target=None):
        if name not in TARGETS or not _wanted(name):
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


if any(_wanted(name) for name in TARGETS):
    sys.meta_path.insert(0, _PatchOnImport())
