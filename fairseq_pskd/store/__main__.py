"""``python -m fairseq_pskd.store {inspect,estimate} ...`` (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
