"""clicktower.modeling."""
if __name__ == "modeling":  # imported by its bare name from the repository root: see kernels/_shadow.py
    from clicktower.kernels._shadow import step_aside

    step_aside(__name__, __path__[0])
