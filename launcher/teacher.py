"""``python -m clicktower.launcher.teacher``: the ``clicktower teacher`` command, for
``accelerate launch -m clicktower.launcher.teacher score ...`` (scoring split over ranks).
"""
import sys

from clicktower.launcher.commands.teacher import main
from clicktower.launcher.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
