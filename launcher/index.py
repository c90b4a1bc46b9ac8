"""``python -m clicktower.launcher.index``: the ``clicktower embed`` command, kept under this name
for the documented ``accelerate launch -m clicktower.launcher.index ...`` lines.
"""
import sys

from clicktower.launcher.commands.embed import main
from clicktower.launcher.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
