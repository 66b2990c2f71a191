from setuptools import find_namespace_packages, setup

setup(
    name="deepfense-losses",
    version="0.1.0",
    description="Margin-softmax loss heads for PyTorch (AMSoftmax, ASoftmax, OCSoftmax, CrossEntropy, ArcFace, "
                "CombinedMargin) with fused Triton kernels; a drop-in for DeepFense",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # `deepfense` is an implicit namespace package (no __init__.py of ours), so it merges with the DeepFense
    # framework's `deepfense` package in one environment. Only our sub-packages: never DeepFense's (cli, config, data,
    # models, training, utils), even from a tree that holds them.
    packages=find_namespace_packages(include=["deepfense", "deepfense.benchmark*", "deepfense.kernels*",
                                              "deepfense.losses*"]),
    python_requires=">=3.10",
    # No upper bound: a cap would make pip replace a user's newer torch. CI and the Quick start pin the local CPU
    # build with constraints-cpu.txt instead.
    install_requires=["torch>=2.4", "pyyaml>=5.1"],
    extras_require={
        # triton 3.4/3.5 are what torch 2.8/2.9 pin (DeepFense caps torch at 2.9); tests pass there except the fp64
        # tl.dot paths triton 3.4 cannot compile, which are skipped with that reason.
        # pytest-xdist: the README's test command runs one worker per core, and with --dist loadgroup keeps each
        # module-level xdist_group on one worker, so a shared fixture is built once (tests/test_xdist_groups.py checks
        # it on the installed versions: it holds on pytest 9.0.3 and fails on 9.2.0 with xdist 3.8, hence pytest < 9.1);
        # pytorch-metric-learning: the toolkit-parity tests run its own classes
        "dev": ["triton>=3.4", "pytest>=7,<9.1", "pytest-benchmark>=4", "pytest-xdist>=3,<4",
                "pytorch-metric-learning>=2.0"],
        # peers the benchmark compares against where they install (pytorch-metric-learning's CosFace/SphereFace), and
        # the plot of time against B and C
        "bench": ["pytorch-metric-learning>=2.0", "matplotlib>=3.5"],
    },
    # Not `deepfense`: that command belongs to the DeepFense framework.
    entry_points={"console_scripts": ["deepfense-losses=deepfense.benchmark.cli:main"]},
)
