"""nitro-ar: fast Triton kernels and an official-compatible model layer for AMD's Nitro-AR / Nitro-E."""
from setuptools import setup

# Triton is deliberately not a base requirement: CUDA and ROCm builds of torch ship their own
# matching Triton (`triton` / `pytorch-triton-rocm`), and a plain `triton` requirement can make
# pip install a second, CUDA-only Triton over ROCm's. CPU-only environments (CI) use the extra.
BASE = ["torch>=2.4", "einops", "safetensors", "transformers", "tqdm"]
EXTRAS = {
    "triton": ["triton>=3.0"],
    "pipeline": ["diffusers>=0.32", "pillow"],
    "train": ["accelerate>=1.0", "pyyaml"],
    "dev": ["pytest", "pytest-benchmark", "hypothesis", "pillow", "matplotlib"],
}

setup(
    name="nitro-ar",
    version="0.1.0",
    description="Fast Triton kernels and an official-compatible PyTorch model layer for Nitro-AR and Nitro-E",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["nitro_ar", "nitro_ar.fast", "nitro_ar.kernels"],
    # Kernels live in the top-level `kernels/` folder but install as `nitro_ar.kernels`: a
    # top-level module named `kernels` would clash with the Hugging Face `kernels` package.
    package_dir={"nitro_ar": "nitro_ar", "nitro_ar.kernels": "kernels"},
    package_data={"nitro_ar.kernels": ["configs/*.json"]},
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["nitro-ar=nitro_ar.cli:main"]},
)
