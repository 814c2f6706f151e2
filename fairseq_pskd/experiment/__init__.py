"""One experiment, end to end: train, (average), generate, score, calibrate; and the table.

    python -m fairseq_pskd.experiment run --prepared DATA --out RUN_DIR [--average-last N]
        [--beam 5 --lenpen 1.0] [--test-subsets test,test1] [--cpu] -- FAIRSEQ-TRAIN-ARGS...
    python -m fairseq_pskd.experiment score RUN_DIR --src RAW.SRC --ref RAW.TGT [--cpu]
    python -m fairseq_pskd.experiment lenpen RUN_DIR [--grid 0.6,0.8,...,2.0,2.5,3.0]
    python -m fairseq_pskd.experiment table RUN_DIR/results.json ... [--markdown] [--paired-bs]
                                                                      [--mean-over-seeds]
    python -m fairseq_pskd.experiment updates-per-epoch --prepared DATA -- FAIRSEQ-TRAIN-ARGS...

``DATA`` is what scripts/prepare-*.sh wrote (data-bin/, ref/, prepare.json). Every recipe
(the CPU quickstart, examples/*) goes through ``run``, so baseline and PS-KD are trained,
decoded and scored by the same code. Steps are idempotent: fairseq-train resumes from
checkpoint_last.pt (and returns at once when training is complete); the later steps are
skipped when their output exists and is newer than the checkpoint they read (a decode also
when made with the same beam and length penalty). A rerun must
give the same fairseq-train arguments (recorded in RUN_DIR/train_args.json): otherwise it stops
with an error instead of resuming, or re-scoring, checkpoints trained with other ones.
``score`` decodes and scores any raw test set with a finished run, through the same
preprocessing, checkpoint and decoding settings (output in RUN_DIR/score-NAME). ``lenpen``
chooses a run's length penalty on validation data and decodes its test sets with it (output in
RUN_DIR/lenpen, a results.json that ``table`` reads like any run's).
"""
# The docstring above is also the help text of the command line (cli.py). One module per
# command: run, score, lenpen, table, updates_per_epoch; common.py and decode.py hold what
# they share.
from .cli import main
from .common import USER_DIR, ExperimentError, log
from .decode import SENTENCE_KEYS
from .run import check_same_training, hardware, training_wall_seconds
from .table import COLUMNS, MEAN_COLUMNS, format_means, format_table, paired_bootstrap, table_extras

__all__ = ["main", "USER_DIR", "ExperimentError", "log", "SENTENCE_KEYS", "check_same_training", "hardware",
           "training_wall_seconds", "COLUMNS", "MEAN_COLUMNS", "format_means", "format_table",
           "paired_bootstrap", "table_extras"]
