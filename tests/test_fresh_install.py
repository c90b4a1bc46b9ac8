"""A fresh clone works from its root: the code folders never shadow the PyPI packages of the
same name, and the documented entry points start there (issue: transformers >= 5.25 imports
Hugging Face's ``kernels``, which the root's ``kernels/`` folder used to shadow).

Every command runs with the repository root as its working directory, as a user types it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, clicktower, run

pytestmark = pytest.mark.e2e

PROBE = """
import importlib, importlib.util, json, sys
spec = importlib.util.find_spec(sys.argv[1])
found = {"spec": None if spec is None else [spec.origin, list(spec.submodule_search_locations or [])]}
try:
    module = importlib.import_module(sys.argv[1])
except ModuleNotFoundError as exc:
    found["missing"] = str(exc)
else:
    found["file"] = getattr(module, "__file__", None)
print(json.dumps(found))
"""
FOLDERS = ("kernels", "data", "modeling", "launcher")


def _resolve(name: str, cwd=REPO) -> dict:
    result = run([sys.executable, "-c", PROBE, name], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _outside(root, places: list) -> bool:
    return all(p and not str(p).startswith(f"{root}/{name}") for p in places for name in FOLDERS)


def test_installed_kernels_package_wins_over_the_root_folder():
    import transformers
    from packaging.version import Version

    # The trap this guards against appears with transformers 5.25 (it imports `kernels`).
    assert Version(transformers.__version__) >= Version("5.25"), "the lock should test transformers >= 5.25"
    found = _resolve("kernels")
    assert "missing" not in found
    origin, locations = found["spec"]  # the finder itself, not only the import, skips the folder
    assert "site-packages" in origin and found["file"] == origin and _outside(REPO, [origin, *locations])
    # And transformers' own use of it, from the root.
    result = run([sys.executable, "-c", "import kernels, transformers.integrations.hub_kernels"], cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", ["data", "modeling", "launcher"])
def test_bare_folder_names_resolve_to_nothing_from_the_root(name):
    found = _resolve(name)
    # No PyPI package of that name is installed here: nothing is found, as if this repository
    # were not on sys.path.
    assert found["spec"] is None
    assert found["missing"] == f"No module named '{name}'"


def test_the_guard_hides_only_a_checkout_and_only_the_code_folders(tmp_path):
    """The installed path hook (launcher/_rootguard.py) keys on a checkout, not on a name."""
    for root, marked in ((tmp_path / "checkout", True), (tmp_path / "other", False)):
        for name in ("data", "tests"):
            (root / name).mkdir(parents=True)
            (root / name / "__init__.py").write_text("")
        (root / "launcher").mkdir()
        if marked:
            (root / "launcher" / "_rootguard.py").write_text("")
        assert (_resolve("data", cwd=root)["spec"] is None) == marked
        assert _resolve("tests", cwd=root)["spec"][0] == str(root / "tests" / "__init__.py")


def test_installed_guard_is_this_checkouts():
    """An edit to launcher/_rootguard.py needs a reinstall (make install does it): catch a stale copy."""
    import _clicktower_rootguard

    assert open(_clicktower_rootguard.__file__).read() == (REPO / "launcher" / "_rootguard.py").read_text()


def test_python_m_entry_points_start_from_the_root():
    for module in ("train", "evaluate", "index", "mine", "teacher"):
        result = run([sys.executable, "-m", f"clicktower.launcher.{module}", "--help"], cwd=REPO)
        assert result.returncode == 0 and "usage" in result.stdout, (module, result.stderr[-2000:])


def test_python_m_pytest_from_the_root_collects():
    result = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_config.py"], cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "tests/test_config.py::" in result.stdout


def test_make_targets_parse():
    result = subprocess.run(["make", "-n", "-B", "install", "demo", "test", "test-fast", "test-latest"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "-c constraints.txt" in result.stdout  # installs come from the lock


def test_demo_smoke(tmp_path):
    """`clicktower demo` at a tiny size: synthesise, shard, evaluate, train, evaluate, table."""
    result = clicktower("demo", "--out", str(tmp_path / "demo"), "--pairs", "300", "--cold-items", "10",
                        "train.max_steps=2", "train.batch_size=8", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(table) == {"before", "after"}
    assert table["before"]["num_queries"] == table["after"]["num_queries"] > 0
    assert (tmp_path / "demo" / "run" / "final").is_dir()
    # Where the model went is the last line a user sees (stderr, after the JSON on stdout).
    final = tmp_path / "demo" / "run" / "final"
    assert result.stderr.strip().splitlines()[-1] == f"[demo] the fine-tuned model: {final}"
    # configs/demo.yaml warms up over 20 steps: 2 steps never reach optim.lr, and train() says so
    # (the check_warmup call in the training path, not only the check itself).
    assert "optim.warmup_steps=20 is not shorter than the run (2 steps)" in result.stderr
