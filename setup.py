"""fairseq-pskd: progressive self-knowledge distillation (PS-KD) for fairseq NMT.

Install with `bash scripts/install.sh` (it also installs a fairseq that runs on your Python).
fairseq itself is not listed in install_requires on purpose: the maintained builds for
Python >= 3.11 are published under other distribution names (ve-fairseq, fairseq-fixed)
and PyPI's `fairseq` 0.12.2 does not run there, so naming it would install a broken one.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "fairseq_pskd" / "__init__.py").read_text()).group(1)

setup(
    name="fairseq-pskd",
    version=version,
    description="Progressive self-knowledge distillation (PS-KD) criterion for fairseq NMT",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fairseq_pskd", "fairseq_pskd.*"]),
    install_requires=[
        "numpy",
        "torch>=2.0",
        "sacrebleu>=2.0",
        "sentencepiece",
        "sacremoses",
    ],
    extras_require={"plots": ["matplotlib"], "test": ["pytest"]},
    license="MIT",
)
