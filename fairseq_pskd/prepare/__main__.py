"""python -m fairseq_pskd.prepare ...: see cli.py."""
import sys

from .cli import main

sys.exit(main())
