"""The training engine: config composition, the step, the loop and its observers, checkpoints,
optimiser, distributed set-up, preemption, periodic evaluation and export.

Start reading at ``training.py`` (``train(cfg)``, top to bottom), then ``step.py`` and ``loop.py``.
"""
