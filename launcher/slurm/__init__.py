"""The SLURM job template ``train.sbatch`` (beside this file) and how it is filled in and
submitted; ``clicktower slurm submit`` (``launcher/commands/slurm.py``) maps its options onto
these. The template runs one ``accelerate launch`` per node and requeues itself on preemption.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from importlib import resources

from clicktower.launcher.errors import ConfigError

SETTINGS_MARKER = "# @clicktower-settings@"


def template_text() -> str:
    """The packaged ``train.sbatch`` template."""
    return (resources.files("clicktower.launcher.slurm") / "train.sbatch").read_text()


def render(template: str, directives: dict[str, str], settings: dict[str, str]) -> str:
    """Fill the template: ``#SBATCH --key=value`` lines and ``CLICKTOWER_*`` exports.

    Args:
        template: the text of ``train.sbatch``.
        directives: sbatch long options without dashes (``nodes``) -> value; a template line
            for the same option is replaced, others are added after the template's last one.
        settings: environment variables written as ``export NAME=value`` at the settings marker.
    """
    lines = template.splitlines()
    pending = dict(directives)
    for i, line in enumerate(lines):
        if line.startswith("#SBATCH --"):
            key = line[len("#SBATCH --"):].split("=", 1)[0].split()[0]
            if key in pending:
                lines[i] = f"#SBATCH --{key}={pending.pop(key)}"
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    lines[last + 1:last + 1] = [f"#SBATCH --{key}={value}" for key, value in pending.items()]
    marker = next((i for i, line in enumerate(lines) if line.startswith(SETTINGS_MARKER)), None)
    if marker is None:
        raise ConfigError(f"train.sbatch template: no '{SETTINGS_MARKER}' line")
    lines[marker:marker + 1] = ["# Rendered by `clicktower slurm submit`:"] + [
        f"export {name}={shlex.quote(value)}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def submit(script: str) -> str:
    """Submit a job script with ``sbatch`` (on stdin); returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise FileNotFoundError("sbatch not found on PATH: run on a SLURM login node (or use --dry-run)")
    result = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise ConfigError(f"sbatch rejected the job: {message}")
    return result.stdout.strip().split(";")[0]
