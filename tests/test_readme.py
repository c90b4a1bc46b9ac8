"""The README's commands, then those of ``docs/*.md``, run as pasted, in order, from a copy of
the repository root, at tiny sizes, so that neither can drift from the code (docs/testing.md).

Every ```bash block is read one command per line (a trailing ``\\`` continues a line;
comment-only lines are skipped) and run with bash in the copy; the docs' blocks run after the
README's, in the state they left (``work/shards``, ``runs/demo/final``). The only changes:

* a command whose line carries ``[readme-test: skip, REASON]`` is not run; the test lists
  every such command and its reason (a warning in pytest's summary);
* ``SIZE_REWRITES`` shrinks sizes (pairs, steps, batch) and nothing else;
* ``BUCKET`` names a bucket on moto's S3 server on 127.0.0.1 (``tests/support/store_servers.py``);
* a docs command identical to one already run (the README's train line, quoted in
  docs/training.md) is not run twice.

Afterwards every file the commands made must lie in a git-ignored folder, and each command's
output is checked for what a user waits for (progress lines, the model's folder last).
"""
from __future__ import annotations

import re
import resource
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, cli_env
from procs import kill_tree

pytest.importorskip("moto")

from store_servers import S3_ENV, make_bucket, moto_s3  # noqa: E402  (after the moto check)

README = REPO / "README.md"
# docs/*.md in the order the README's table sends a reader; every file with a ```bash block.
DOCS_ORDER = ("training.md", "retrieval.md", "teacher.md", "data.md", "checkpoints.md", "distributed.md",
              "multinode.md", "slurm.md", "testing.md")
SKIP = re.compile(r"\[readme-test: skip, ([^\]]+)\]")
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
BUCKET = "readme-bucket"

# A training run of the README at test size: 2 steps of 8 pairs, a warm-up that fits in them
# (data.num_workers=0 saves a DataLoader worker's start-up, seconds per run on 2 cores; the
# data read is the same).
TRAIN_SMALL = ["train.max_steps=2", "train.epochs=null", "train.batch_size=8", "optim.warmup_steps=1",
               "data.num_workers=0"]
# (how a command starts, after any VAR=value prefix; regex substitutions; arguments appended):
# sizes only. configs/tiny.yaml runs are not shrunk: they are tiny already, and their steps
# (checkpoint every 8, resume at 8) are what the docs show.
SIZE_REWRITES = [
    ("clicktower synth", [(r"--pairs \d+", "--pairs 300"), (r"--cold-items \d+", "--cold-items 10")], []),
    ("clicktower train", [], TRAIN_SMALL),
    ("accelerate launch -m clicktower.launcher.train", [], TRAIN_SMALL),
    ("clicktower demo", [], ["--pairs", "300", "--cold-items", "10", *TRAIN_SMALL]),
    ("clicktower teacher train", [(r"--epochs \d+", "--max-steps 2")], []),
]
# What each kind of command must say while a user waits (stderr), checked on its output.
PROGRESS = {"clicktower shard": "shard -> ", "clicktower eval": "eval: embed catalog",
            "clicktower eval --index": "eval: index ",
            "clicktower embed": "embed catalog", "clicktower mine": "mine: items",
            "clicktower train": "[clicktower] train: "}
# Never copied: what a fresh clone does not have.
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*")
NOT_IN_A_CLONE = (".git", ".venv", ".venv-latest", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info",
                  "build", "dist", "runs", "demo_out", "work")


def readme_commands(text: str) -> list[list[tuple[str, str | None]]]:
    """The ```bash blocks of a README as lists of ``(command, reason it is skipped or None)``.

    Args:
        text: the README.
    """
    blocks = []
    for body in BASH_BLOCK.findall(text):
        commands, pending = [], ""
        for line in body.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1]
                continue
            command, pending = (pending + line).strip(), ""
            skipped = SKIP.search(command)
            commands.append((command, skipped[1].strip() if skipped else None))
        blocks.append(commands)
    return blocks


def bare(command: str) -> str:
    """``command`` without its leading ``VAR=value`` assignments."""
    return command[ENV_PREFIX.match(command).end():]


def shrink(command: str) -> str:
    """``command`` at test size (``SIZE_REWRITES``), with the test's bucket for ``BUCKET``."""
    command = command.replace("s3://BUCKET/", f"s3://{BUCKET}/")
    for start, substitutions, appended in SIZE_REWRITES:
        if not bare(command).startswith(start) or (appended is TRAIN_SMALL and "configs/tiny.yaml" in command):
            continue
        for pattern, replacement in substitutions:
            command = re.sub(pattern, replacement, command)
        code, hash_, comment = command.partition(" #")  # appended before a trailing comment
        command = " ".join([code.rstrip(), *appended]) + (f" {hash_.strip()}{comment}" if hash_ else "")
    return command


def _run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except BaseException:
        kill_tree(proc, timeout=30)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the finished commands' processes
    return usage.ru_utime + usage.ru_stime


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _ignored_top_folders(gitignore: Path) -> set[str]:
    """The top-level folders the repository ignores (``/runs/`` lines)."""
    return {m[1] for m in re.finditer(r"^/([^/\s*]+)/$", gitignore.read_text(), re.M)}


def _check_output(command: str, result: subprocess.CompletedProcess) -> None:
    command = bare(command)
    starts = [start for start in PROGRESS if command.startswith(start)]
    if starts:  # the most specific entry: `clicktower eval --index` embeds no catalog
        said = PROGRESS[max(starts, key=len)]
        assert said in result.stderr, f"{command}: no {said!r} on stderr:\n{result.stderr[-2000:]}"
    if command.startswith("clicktower train"):
        out_dir = re.search(r"train\.output_dir=(\S+)", command)[1]
        assert result.stdout.strip().splitlines()[-1] == f"saved the trained model: {out_dir}/final"
    if command.startswith("clicktower demo"):
        assert result.stderr.strip().splitlines()[-1].startswith("[demo] the fine-tuned model: ")


@pytest.mark.unit
def test_readme_blocks_parse_with_skips_and_continuations():
    blocks = readme_commands("text\n```bash\n# a comment\nclicktower a \\\n  --b c   # note\n\nmake x"
                             "   # [readme-test: skip, needs a GPU]\n```\n```python\nnot_bash()\n```\n")
    assert blocks == [[("clicktower a   --b c   # note", None),
                       ("make x   # [readme-test: skip, needs a GPU]", "needs a GPU")]]
    assert shrink("clicktower synth --out w --pairs 20000 --cold-items 400   # note") == \
        "clicktower synth --out w --pairs 300 --cold-items 10 # note"
    assert shrink("clicktower train --config c x=s3://BUCKET/m") == \
        f"clicktower train --config c x=s3://{BUCKET}/m " + " ".join(TRAIN_SMALL)
    assert shrink("WANDB_MODE=offline clicktower train --config c") == \
        "WANDB_MODE=offline clicktower train --config c " + " ".join(TRAIN_SMALL)
    assert shrink("clicktower train --config configs/tiny.yaml a=1") == "clicktower train --config configs/tiny.yaml a=1"


@dataclass
class Walkthrough:
    """A copy of the root that a reader works in, from the first README command to the last docs one."""
    clone: Path
    env: dict[str, str]
    before: set[Path]
    done: set[str] = field(default_factory=set)  # the commands run, as run
    readme_done: bool = False

    def run_blocks(self, where: str, blocks: list[list[tuple[str, str | None]]]) -> list[tuple[str, str]]:
        """Run ``blocks`` of ``where`` in order; return the skipped commands and their reasons."""
        skipped, timings = [], []
        for block in blocks:
            for command, reason in block:
                if reason:
                    skipped.append((command, reason))
                    continue
                command = shrink(command)
                if command in self.done:
                    continue
                started, cpu = time.monotonic(), _children_cpu_s()
                result = _run(command, self.clone, self.env)
                timings.append((time.monotonic() - started, _children_cpu_s() - cpu, command))
                assert result.returncode == 0, \
                    f"{where}: command failed (exit {result.returncode}): {command}\n{result.stderr[-4000:]}"
                _check_output(command, result)
                self.done.add(command)
        # CPU seconds as well as wall seconds: on a shared machine the wall time says little.
        print(f"{where}:\n" + "\n".join(f"{wall:6.1f} s wall {cpu:6.1f} s CPU  {c}" for wall, cpu, c in timings))
        print(f"total: {sum(t[0] for t in timings):.0f} s wall, {sum(t[1] for t in timings):.0f} s CPU")
        return skipped

    def run_readme(self) -> list[tuple[str, str]]:
        blocks = readme_commands(README.read_text(encoding="utf-8"))
        assert len(blocks) >= 5 and all(blocks), "every ```bash block of the README holds a command"
        skipped = self.run_blocks("README.md", blocks)
        self.readme_done = True
        return skipped

    def check_outputs(self) -> None:
        """Every file the commands made lies in a git-ignored top-level folder."""
        ignored = _ignored_top_folders(self.clone / ".gitignore")
        made = sorted(_files(self.clone) - self.before)
        assert made, "the commands wrote nothing?"
        stray = [str(p) for p in made if p.parts[0] not in ignored]
        assert not stray, f"outputs outside the git-ignored folders {sorted(ignored)}: {stray[:10]}"


def _warn_skipped(where: str, skipped: list[tuple[str, str]]) -> None:
    warnings.warn(f"{where} commands not run (their [readme-test: skip, ...] markers): " +
                  "; ".join(f"{command.split('  ')[0]} ({reason})" for command, reason in skipped))


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    root = tmp_path_factory.mktemp("walkthrough")
    clone = root / "clicktower"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE))
    with moto_s3() as (endpoint, _faults):
        make_bucket(endpoint, BUCKET)
        # An empty HF_HOME: the README's bare `accelerate launch` must not read this user's
        # accelerate config (the model comes from a pip package, not the hub cache).
        env = {**cli_env(), **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "HF_HOME": str(root / "hf_home")}
        yield Walkthrough(clone, env, _files(clone))


@pytest.mark.e2e
@pytest.mark.slow
def test_every_readme_command_runs_as_pasted(walkthrough):
    _warn_skipped("README", walkthrough.run_readme())
    walkthrough.check_outputs()


@pytest.mark.e2e
@pytest.mark.slow
def test_every_docs_command_runs_as_pasted_after_the_readme(walkthrough):
    with_blocks = {p.name for p in (REPO / "docs").glob("*.md") if BASH_BLOCK.search(p.read_text(encoding="utf-8"))}
    assert with_blocks == set(DOCS_ORDER), f"docs with commands not in DOCS_ORDER: {with_blocks ^ set(DOCS_ORDER)}"
    if not walkthrough.readme_done:  # this test alone (-k docs): the README's state first
        walkthrough.run_readme()
    skipped = []
    for name in DOCS_ORDER:
        skipped += walkthrough.run_blocks(f"docs/{name}", readme_commands((REPO / "docs" / name).read_text("utf-8")))
    _warn_skipped("docs", skipped)
    walkthrough.check_outputs()
