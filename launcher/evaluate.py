"""``python -m clicktower.launcher.evaluate``: the ``clicktower eval`` command, kept under this name
for the documented ``accelerate launch -m clicktower.launcher.evaluate ...`` lines.
"""
import sys

from clicktower.launcher.commands.eval import main
from clicktower.launcher.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
