"""``python -m clicktower.launcher.mine``: the ``clicktower mine`` command, kept under this name
for the documented ``accelerate launch -m clicktower.launcher.mine ...`` lines.
"""
import sys

from clicktower.launcher.commands.mine import main
from clicktower.launcher.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
