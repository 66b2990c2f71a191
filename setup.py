from setuptools import find_packages, setup

setup(
    name="deepfense-losses",
    version="0.1.0",
    description="Fused Triton margin-softmax loss heads (AMSoftmax, ASoftmax, OCSoftmax, CrossEntropy) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["deepfense", "deepfense.*"]),
    python_requires=">=3.10",
    # A range, so a GPU user keeps the torch build they have (tested on 2.13 CPU; the GPU machines carry 2.11);
    # the bound keeps a fresh install on these machines on the local 2.13 CPU wheel, not a multi-GB CUDA download.
    install_requires=["torch>=2.4,<2.14", "pyyaml>=5.1"],
    extras_require={
        "dev": ["triton>=3.6,<3.10", "pytest>=7", "pytest-benchmark>=4"],
        # peers the benchmark compares against where they install (pytorch-metric-learning's CosFace/SphereFace), and
        # the plot of time against B and C
        "bench": ["pytorch-metric-learning>=2.0", "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["deepfense=deepfense.__main__:main"]},
)
