"""clicktower config: every experiment config key with its type, default and meaning.

    clicktower config                                  # the defaults
    clicktower config --config configs/demo.yaml train.max_steps=20   # what that run would use
    clicktower config --markdown > docs/config.md      # the reference page

The keys, types, defaults and help come from the config dataclasses themselves
(``clicktower.launcher.engine.config_keys``).
"""
from __future__ import annotations

import argparse
import sys

from clicktower.launcher.errors import run_cli

TITLE = "Configuration reference"
INTRO = """\
Every key of an experiment config, generated from the config dataclasses by
`clicktower config --markdown > docs/config.md` (a test checks that this page is current; edit
the dataclass docstrings, not this page). A YAML config holds one mapping per section
(`optim: {lr: 1.0e-4}`); on the command line any key is set as `section.key=value`
(`clicktower train --config configs/demo.yaml optim.lr=1e-4`), the value read as YAML. Unknown
keys and wrong types are errors naming the key. `clicktower config --config FILE [overrides]`
prints the values a run would use. Examples: `configs/*.yaml`; the why of the main choices:
[training.md](training.md), [data.md](data.md), [checkpoints.md](checkpoints.md)."""


def main(argv: list[str] | None = None) -> int:
    """``clicktower config``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment YAML file: show its values (changed ones note the default)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=20")
    parser.add_argument("--markdown", action="store_true", help="print the reference page (docs/config.md)")
    args = parser.parse_args(argv)
    # Imported after parsing: the config classes import torch, which --help does not need.
    from clicktower.launcher.engine.config import ExperimentConfig, load_config
    from clicktower.launcher.engine.config_keys import config_keys, render_markdown, render_text

    if args.markdown:
        if args.config or args.overrides:
            parser.error("--markdown prints the defaults: it takes no --config or overrides")
        print(render_markdown(ExperimentConfig, TITLE, INTRO))
        return 0
    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    source = "the defaults" if cfg is None else " + ".join(filter(None, [args.config, " ".join(args.overrides)]))
    print(f"# key=value ({source}), type, meaning; set as section.key=value; full text: docs/config.md")
    print(render_text(config_keys(ExperimentConfig), cfg))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
