"""How to read a two-run comparison of the quickstart's main job: which of its differences
exceed the run-to-run variation measured in docs/RESULTS.md, in plain sentences computed from
the table (``experiment table --reading``).

A difference of two scores can move by as much as both scores move between reruns, so a
difference is read as real only when it exceeds the sum of the two systems' largest measured
run-to-run changes. The figures are docs/RESULTS.md's; update both together.
"""
from __future__ import annotations

# docs/RESULTS.md, "Run to run": the quickstart's command with the same seed on two machines of
# one kind gave the baseline 34.57 and 35.01 BLEU (0.44 apart), PS-KD (a_T 0.2) 34.41 and 34.10
# (0.31 apart).
BLEU_VARIATION = {"baseline": 0.44, "pskd": 0.31}
# ECE between the two seeds of the converged runs (docs/RESULTS.md, "The converged comparison"):
# baseline 5.63 and 5.28 % (0.35 points), PS-KD a_T 0.1 4.99 and 4.88, a_T 0.8 2.13 and 2.01
# (0.12 at most); the baseline's two 12-epoch runs above differed by 0.09 (5.06, 5.15 %).
ECE_VARIATION_PTS = {"baseline": 0.35, "pskd": 0.12}


def reading(base: dict, other: dict, subset: str = "test", p: str | None = None) -> list[str]:
    """Three sentences on ``other`` (PS-KD) against ``base`` (the baseline), results.json dicts,
    on ``subset``: BLEU and ECE against their measured run-to-run variation, and where the
    converged comparison is."""
    a, b = base["tests"][subset], other["tests"][subset]
    name_a, name_b = base["name"], other["name"]
    d_bleu, d_ece = b["bleu"] - a["bleu"], 100 * (b["ece"] - a["ece"])
    bleu_noise = sum(BLEU_VARIATION.values())
    ece_noise = sum(ECE_VARIATION_PTS.values())
    p_text = f" (paired bootstrap p = {p}: that measures the test set's sampling only)" if p else ""
    moved = (f"reruns of one command moved each system's BLEU by up to "
             f"{max(BLEU_VARIATION.values()):.2f} (docs/RESULTS.md, \"Run to run\"), so a difference "
             f"under {bleu_noise:.2f} can be run-to-run variation alone")
    if abs(d_bleu) > bleu_noise:
        verdict = f"{name_b} is {'ahead' if d_bleu > 0 else 'behind'} beyond that variation, on one seed"
    else:
        verdict = "read it as a tie"
    sentences = [f"BLEU: {name_b} {d_bleu:+.2f} against {name_a}{p_text}; {moved}: {verdict}."]
    ece_moved = (f"each system's ECE moved by up to {max(ECE_VARIATION_PTS.values()):.2f} points "
                 f"between runs, so a difference under {ece_noise:.2f} can be variation alone")
    if abs(d_ece) > ece_noise:
        sentences.append(f"ECE: {d_ece:+.2f} points; {ece_moved}: {name_b} is "
                         f"{'better' if d_ece < 0 else 'worse'} calibrated than {name_a}.")
    else:
        sentences.append(f"ECE: {d_ece:+.2f} points; {ece_moved}: no calibration difference to read.")
    sentences.append("The converged comparison, two seeds per system (`bash scripts/quickstart.sh "
                     "--long`), is in docs/RESULTS.md.")
    return sentences
