"""One module per ``clicktower`` verb, each a thin argparse front with ``main(argv)``.

Only ``clicktower.launcher.cli`` and the ``python -m clicktower.launcher.X`` shims import these;
the work they call lives in ``clicktower.launcher.engine`` and ``clicktower.launcher.retrieval``.
"""
