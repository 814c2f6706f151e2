"""``lenpen``: choose a finished run's length penalty on validation data and decode its test
sets with it (into RUN_DIR/lenpen, a results directory that ``table`` reads like a run's)."""
import json
import os
from pathlib import Path

from .common import ExperimentError, finished_run, log
from .decode import SENTENCE_KEYS, decode_and_score

__all__ = ["lenpen"]


def lenpen(args):
    """Choose the length penalty on validation data, then decode the test sets with it.

    Beam search's length penalty changes how long the translations are, and BLEU's brevity
    penalty punishes a system that is too short whatever its n-gram precision: two systems
    compared at one fixed lenpen can differ by their length alone. Each value of the grid decodes
    the validation subset; the one with the best BLEU (the smallest on ties) decodes the run's
    test subsets into RUN/lenpen/, a results directory that `table` reads like a run's (the
    calibration is the run's own: teacher-forced, decoding plays no part in it).
    """
    run_dir, results, prepared, manifest = finished_run(args.run)
    src, tgt = results["src"], results["tgt"]
    data_bin = prepared / manifest.get("data_bin", "data-bin")
    ckpt = Path(results["checkpoint"])
    out = run_dir / "lenpen"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args.beam = results["beam"]
    grid = sorted({float(f"{v:g}") for v in args.grid})  # one value per decode directory name
    ref = prepared / "ref" / f"{args.valid_subset}.{tgt}"
    if not ref.exists():
        raise ExperimentError(f"reference {ref} not found: --valid-subset names a split the "
                              "prepared data has no reference for")
    bleu = {}
    for value in grid:
        args.lenpen = value
        scored = decode_and_score(data_bin, src, tgt, ckpt, args.valid_subset, ref,
                                  out / f"{args.valid_subset}.lenpen{value:g}", args, env)
        bleu[value] = scored["bleu"]
        log(f"lenpen {value:g}: BLEU {scored['bleu']:.2f} on {args.valid_subset} "
            f"({scored['bleu_detail'].split('(')[-1].rstrip(')')})")
    best = max(grid, key=lambda v: (round(bleu[v], 6), -v))
    if len(grid) > 1 and best in (grid[0], grid[-1]):
        log(f"warning: the best length penalty, {best:g}, is at the end of the grid: a value "
            "beyond it may be better (--grid)")
    args.lenpen = best
    tuned = {**results, "lenpen": best, "tests": {},
             "lenpen_choice": {"subset": args.valid_subset, "beam": args.beam,
                               "bleu": {f"{v:g}": bleu[v] for v in grid}}}
    for subset, old in results["tests"].items():
        test_ref = prepared / "ref" / f"{subset}.{tgt}"
        # decoded in a directory of its lenpen (a rerun that chooses another one never reuses
        # this decode), then put where `table` reads a run's hypotheses and scores
        at = out / f"{subset}.lenpen{best:g}"
        s = decode_and_score(data_bin, src, tgt, ckpt, subset, test_ref, at, args, env)
        for name in (f"hyp.{subset}.{tgt}", f"score.{subset}.json", f"sentence.{subset}.tsv"):
            (out / name).write_bytes((at / name).read_bytes())
        tuned["tests"][subset] = {**old, "bleu": s["bleu"], "chrf": s["chrf"],
                                  "bleu_signature": s["bleu_signature"],
                                  "chrf_signature": s["chrf_signature"], "sentences": s["n"],
                                  **{k: s.get(k) for k in SENTENCE_KEYS}}
        calib = run_dir / f"calibration.{subset}.json"
        if calib.exists():
            (out / calib.name).write_bytes(calib.read_bytes())
    (out / "results.json").write_text(json.dumps(tuned, indent=2) + "\n")
    print(f"{results['name']}: lenpen {best:g} chosen on {args.valid_subset} "
          f"(BLEU {', '.join(f'{v:g}: {bleu[v]:.2f}' for v in grid)})")
    for subset, t in tuned["tests"].items():
        print(f"{subset}: BLEU {t['bleu']:.2f} (lenpen {results['lenpen']:g}: "
              f"{results['tests'][subset]['bleu']:.2f}), chrF {t['chrf']:.2f}")
    log(f"results: {out / 'results.json'}")
    return 0
