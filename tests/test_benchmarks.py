"""The throughput benchmark runs end to end and measures what it claims (tiny settings: this
checks the machinery, not the speed; docs/BENCHMARKS.md has the real measurements)."""
import json
import sys

import pytest
from conftest import REPO, run

pytestmark = pytest.mark.e2e


def test_throughput_benchmark_measures_pskd_with_priors_read(toy_data_bin, tmp_path):
    out = tmp_path / "throughput.json"
    proc = run(
        [sys.executable, REPO / "benchmarks" / "throughput.py", "--data-bin", toy_data_bin,
         "--topk", "2", "--remainder", "uniform", "current",
         "--loss-path", "auto", "log_softmax", "--rounds", "1", "--steps", "2", "--warmup", "1", "--cpu",
         "--threads", "1",
         "--json", out, "--", "--max-tokens", "100"], check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "ratio X" in proc.stdout and "pskd k=2 " in proc.stdout and "pskd k=2 current" in proc.stdout
    assert "pskd k=2 current log_softmax" in proc.stdout  # the loss from get_normalized_probs, beside
    result = json.loads(out.read_text())
    pskd = result["runs"]["2"][0]
    assert pskd["pskd_coverage"] == 1.0  # every timed token was trained against a stored prior
    assert pskd["loss_ms_per_step"] > 0 and "ratio_loss" in next(r for r in result["summary"] if r["topk"] == 2)
    assert pskd["peak_rss_mb"] > 0 and pskd["peak_rss_scope"] in ("timed steps", "whole process")
    assert result["runs"]["0"][0]["pskd_coverage"] is None  # the baseline has no PS-KD metrics
    row = next(r for r in result["summary"] if r["topk"] == 2 and r["remainder"] == "uniform")
    assert row["ratio_wps"] == pskd["wps"] / result["runs"]["0"][0]["wps"]
    current = result["runs"]["2/current"][0]
    assert current["pskd_coverage"] == 1.0 and current["loss_ms_per_step"] > 0
    row = next(r for r in result["summary"] if r["remainder"] == "current")
    assert row["ratio_loss"] == current["loss_ms_per_step"] / result["runs"]["0"][0]["loss_ms_per_step"]
    assert row["loss_path"] == "auto" and result["runs"]["2/current/log_softmax"][0]["pskd_coverage"] == 1.0


def test_loss_benchmark_measures_each_path(tmp_path):
    proc = run(
        [sys.executable, REPO / "benchmarks" / "loss_bench.py", "--tokens", "64", "--vocab", "50",
         "--topk", "4", "--rounds", "2", "--dtype", "float16"], check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("label smoothing", "pskd", "no prior"))]
    assert len(rows) == 8 and rows[0].split()[-1] == "1.000"
    assert all(float(line.split()[-1]) > 0 for line in rows)
    assert "float16 logits on cpu" in proc.stdout
