"""sdejax: score-based generative modelling with SDEs in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="sdejax",
    version="0.1.0",
    description="Score-based generative models with SDEs in JAX/Flax: SDEs, losses, "
    "PC/ODE/SDE/DDIM samplers and exact PF-ODE likelihoods.",
    packages=find_packages(include=["sdejax", "sdejax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "diffrax>=0.6",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "Pillow>=10",
        "tqdm>=4.66",
        "lineax",  # ships with diffrax; imported directly for diagonal diffusion operators
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow (clu's writer needs TF)
        # Datasets: TFDS builders read through array_record + grain, with no TensorFlow at run time.
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "array_record>=0.8.6",
        "importlib_resources",  # etils.epath needs it when TFDS runs without TensorFlow
        "scikit-learn>=1.3",  # ships the 8x8 digits used offline
    ],
    extras_require={
        # tf.data input stack and `tfds build` of image datasets (TFDS encodes PNGs with TensorFlow).
        "tf": ["tensorflow-cpu>=2.21"],
        "test": ["tensorflow-cpu>=2.21", "pytest>=8", "pytest-timeout", "pytest-xdist>=3", "scipy>=1.11", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["sdejax=sdejax.cli:run"]},
)
