"""``python -m fairseq_pskd.store {inspect,estimate} ...`` (see cli.py)."""
import sys

from .cli import main

__all__: list = []  # run as a script; the command line's entry point is cli.main

sys.exit(main())
