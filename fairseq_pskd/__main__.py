"""``python -m fairseq_pskd --user-dir``: the path to give fairseq's ``--user-dir``.

fairseq's ``--user-dir`` wants the package's directory; from anywhere but a checkout's root,
with the plugin installed (``pip install .`` or from git), write
``fairseq-train --user-dir "$(python -m fairseq_pskd --user-dir)" --criterion pskd ...``.
"""
import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fairseq_pskd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--user-dir", action="store_true",
                        help="print the directory to pass as fairseq's --user-dir (this installed package's)")
    parser.add_argument("--version", action="store_true", help="print fairseq-pskd's version")
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
    elif args.user_dir:
        print(os.path.dirname(os.path.abspath(__file__)))
    else:
        parser.print_help(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
