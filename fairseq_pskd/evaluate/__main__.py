"""python -m fairseq_pskd.evaluate ...: see cli.py."""
import sys

from .cli import main, setup_logging

setup_logging()  # only as a program: library callers (and pytest) keep their logging
sys.exit(main())
