"""Package layout only (metadata is in pyproject.toml): the top-level `kernels/` folder is
installed as the import package `yan_kernels`, because a PyPI package named plain `kernels`
exists and the two would shadow each other."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["yan_serve", "yan_serve.*"]), "yan_kernels"],
    package_dir={"yan_kernels": "kernels"},
)
