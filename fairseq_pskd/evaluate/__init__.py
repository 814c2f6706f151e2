"""Evaluation for PS-KD NMT models: BLEU/chrF, token-level calibration, checkpoint averaging.

Command line (``python -m fairseq_pskd.evaluate <command> ...``)::

    score        sacreBLEU BLEU and chrF of fairseq-generate output (or plain hypotheses)
    calibration  teacher-forced token-level ECE, accuracy, NLL, AURC / E-AURC + reliability diagram
    average      average the parameters of the last N epoch (or update) checkpoints

One module per command (score.py, calibration.py, average.py; the parsers in cli.py). The
metrics themselves (ECE, reliability bins, AURC, the diagram) are in fairseq_pskd/calibration.py.
fairseq, torch and matplotlib are imported only by the commands that need them.
See docs/EVALUATION.md for the definitions and examples.
"""
from .average import average_checkpoints, cmd_average, last_n_checkpoints
from .calibration import cmd_calibration, collect_token_statistics, load_model
from .cli import build_parser, main, setup_logging
from .common import EvaluationError
from .score import (
                    bleu_chrf,
                    cmd_score,
                    detokenize,
                    read_generate_hypotheses,
                    read_generate_sentence_scores,
                    read_lines,
                    sentence_chrf,
)

__all__ = ["EvaluationError", "read_generate_hypotheses", "read_generate_sentence_scores", "sentence_chrf",
           "read_lines", "detokenize", "bleu_chrf", "cmd_score", "collect_token_statistics", "load_model",
           "cmd_calibration", "last_n_checkpoints", "average_checkpoints", "cmd_average", "build_parser",
           "setup_logging", "main"]
