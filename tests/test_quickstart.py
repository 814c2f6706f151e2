"""The main job, scripts/quickstart.sh, as a user runs it.

The smoke run (--quick: a tiny model, 2 epochs, the real Multi30k) takes several minutes on 2
cores, so it carries the ``slow`` marker: ``bash scripts/test.sh -m slow``. Its option checks
run in the default command's end-to-end tier (each starts the script)."""
import json

import pytest
from conftest import MULTI30K_RAW, REPO, needs_multi30k, run

pytestmark = pytest.mark.e2e

SCRIPT = REPO / "scripts" / "quickstart.sh"


def quickstart(*args, timeout=60):
    return run(["bash", SCRIPT, *args], check=False, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--quick", "--long"], "--quick and --long exclude each other"),
    (["--seed", "one"], "--seed needs a whole number, not 'one'"),
    (["--variant", "baseline", "--", "--criterion", "pskd"], "needs a new run name"),
    (["--variant", "v1"], "needs its training arguments after --"),
    (["--", "--criterion", "pskd"], "arguments after -- need --variant NAME"),
    (["--bogus"], "unknown option --bogus"),
    (["--long", "--seed", "2"], "--long trains seeds 1 and 2 itself"),
    (["--seed"], "--seed needs a value"),
    (["--train-size", "1e3"], "--train-size needs a number of training pairs, not '1e3'"),
    (["--long", "--alphas", "0.4"], "--alphas needs two a_T values in (0, 1]"),
    (["--long", "--alphas", "0.4,1.5"], "--alphas needs two a_T values in (0, 1]"),
    (["--alphas", "0.4,0.8"], "--alphas goes with --long"),
])
def test_wrong_options_stop_before_any_work(args, message, tmp_path):
    proc = quickstart("--work", tmp_path / "work", *args)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stdout
    assert not (tmp_path / "work").exists()  # nothing installed, prepared or trained


@needs_multi30k
def test_train_size_scales_the_schedule_to_the_updates_per_epoch(tmp_path):
    """--train-size N: both runs train on the same N-pair subset, and the warm-up is the
    full-data recipe's 400 updates per 130 updates of an epoch, counted on the subset (an epoch
    of fairseq-train's own), not a constant meant for 29,000 pairs."""
    work = tmp_path / "work"
    proc = quickstart("--quick", "--train-size", 500, "--raw", MULTI30K_RAW, "--work", work, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    manifest = json.loads((work / "data" / "multi30k-de-en" / "prepare.json").read_text())
    assert manifest["splits"]["train"]["pairs"] == 500 and manifest["cleaning"]["train_size"] == 500
    from conftest import epoch_stats

    for name in ("baseline", "pskd"):
        args = json.loads((work / name / "train_args.json").read_text())
        per_epoch = epoch_stats((work / name / "train.log").read_text())[1]["num_updates"]
        assert per_epoch < 130 / 29000 * 500 * 3  # the subset's epoch, not the corpus's
        assert int(args[args.index("--warmup-updates") + 1]) == round(400 * per_epoch / 130)
        assert json.loads((work / name / "results.json").read_text())["tests"]["test"]["sentences"] == 1000
    check_progress_and_reading(proc.stdout, epochs=2)


def check_progress_and_reading(stdout, epochs):
    """One progress line per epoch of each run on the terminal (with the ETA of both runs), then
    the table and the sentences that read it."""
    lines = stdout.splitlines()
    for name in ("baseline", "pskd"):
        mine = [line for line in lines if line.startswith(f"[{name}] epoch ")]
        assert [line.split("  ")[0] for line in mine] == [f"[{name}] epoch {e}/{epochs}" for e in range(1, epochs + 1)]
        assert all("/epoch  ETA " in line and "(all runs: ETA " in line for line in mine), mine
    table = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert max(i for i, line in enumerate(lines) if "] epoch " in line) < table
    reading = [line for line in lines[table:] if line.startswith(("BLEU: pskd", "ECE: "))]
    assert len(reading) == 2 and "run-to-run variation" in reading[0], lines[table:]


@pytest.mark.slow
@needs_multi30k
def test_quick_run_trains_both_systems_and_prints_the_table(tmp_path):
    work = tmp_path / "work"
    proc = quickstart("--quick", "--raw", MULTI30K_RAW, "--work", work, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = {name: json.loads((work / name / "results.json").read_text())
               for name in ("baseline", "pskd")}
    assert "--criterion label_smoothed_cross_entropy" in results["baseline"]["train_command"]
    assert "--criterion pskd" in results["pskd"]["train_command"]
    for r in results.values():
        test = r["tests"]["test"]
        assert test["sentences"] == 1000  # test2016, every sentence decoded
        assert 0 <= test["bleu"] <= 100 and 0 <= test["ece"] <= 1
    table = (work / "results.txt").read_text()
    assert "baseline" in table and "pskd" in table
    check_progress_and_reading(proc.stdout, epochs=2)
    assert (work / "curves.png").stat().st_size > 0
