"""Installs tfp_composed: composed-flow posterior inference for TensorFlow Probability."""

import setuptools

setuptools.setup(
    name="tfp_composed",
    version="0.1.0",
    description=(
        "Posterior inference with pretrained normalizing-flow priors by composing a "
        "trainable pre-generator with the frozen flow (TensorFlow Probability)."
    ),
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["tfp_composed", "tfp_composed.*", "experiments"]),
    package_data={"tfp_composed": ["priors/pretrained/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tensorflow-probability>=0.25,<0.26",
        "tf-keras>=2.21,<2.22",
        "tensorflow-datasets>=4.9,<4.10",
        "importlib_resources>=6",
        "absl-py>=2.1",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "psutil>=5.9",
        "tensorboard>=2.20",
        "arviz>=0.20,<0.24",  # PSIS k-hat (arviz.psislw) in tfp_composed.diagnostics.
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
    },
)
