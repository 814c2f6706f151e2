"""python -m fairseq_pskd.experiment ...: see cli.py."""
import sys

from .cli import main

sys.exit(main())
