"""``python -m clicktower.launcher.train``: the ``clicktower train`` command, kept under this name
for the documented ``accelerate launch -m clicktower.launcher.train ...`` lines.
"""
import sys

from clicktower.launcher.commands.train import main
from clicktower.launcher.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
