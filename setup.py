"""Package layout for setuptools (everything else is in pyproject.toml).

The repository keeps the Hydra configs at its top level (``conf/``); the installed package
carries the same files as the module ``itm.conf``, so an installed itm composes its configs
through Hydra's ``pkg://itm.conf`` with no path. setuptools' automatic discovery cannot map a
folder outside ``src/`` into the package, hence this explicit mapping (an editable install maps
``itm.conf`` back to the checkout's ``conf/``). Every folder of ``conf/`` is a data package
whose ``*.yaml`` files are package data (pyproject.toml).
"""

from setuptools import find_namespace_packages, find_packages, setup

CONF = ["itm.conf", *(f"itm.conf.{p}" for p in find_namespace_packages("conf"))]

setup(
    packages=[*find_packages("src"), *CONF],
    package_dir={"": "src", "itm.conf": "conf"},
)
