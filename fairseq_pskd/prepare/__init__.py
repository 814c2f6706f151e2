"""Data preparation for the PS-KD experiments: IWSLT'15 En-De and Multi30k task 1.

    python -m fairseq_pskd.prepare iwslt15  --out DIR [--raw PATH] [--src en --tgt de] ...
    python -m fairseq_pskd.prepare multi30k --out DIR [--raw DIR]  [--src de --tgt en] ...
    python -m fairseq_pskd.prepare detokenize --lang de < hyp.tok > hyp.txt

(or scripts/prepare-iwslt15.sh / scripts/prepare-multi30k.sh). The output layout, the choices
made and the evaluation recipe are described in docs/DATA.md.

For post-processing fairseq-generate output in Python:

    from fairseq_pskd.prepare.text import detokenize
    plain = detokenize(moses_tokenised_lines, lang="de")

This subpackage uses nothing of fairseq_pskd besides the package import itself; fairseq is
only run as the fairseq-preprocess command.
"""
from .errors import PrepareError
from .text import detokenize, tokenize

__all__ = ["PrepareError", "detokenize", "tokenize"]
