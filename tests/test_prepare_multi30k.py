"""Multi30k preparation on the real data (conftest.MULTI30K_RAW: a local copy of its raw files).

The full preparation runs once per session through scripts/prepare-multi30k.sh (about a minute
on 2 cores); the error cases fail in the first step and run in-process where possible.
"""
import json
import shutil
from pathlib import Path

import pytest
from conftest import MULTI30K_RAW as RAW
from conftest import needs_multi30k
from conftest import run_prepare_multi30k as run_script

from fairseq_pskd.prepare import binarize, cli, subword, text

pytestmark = needs_multi30k

PAIRS = {"train": 29000, "valid": 1014, "test": 1000, "test1": 1000, "test2": 461}
ORIGIN = {"train": "train", "valid": "val", "test": "test_2016_flickr", "test1": "test_2017_flickr",
          "test2": "test_2017_mscoco"}


def copy_raw(dest: Path) -> Path:
    shutil.copytree(RAW, dest)
    for f in dest.iterdir():
        f.chmod(0o644)  # the shared copy is read-only
    return dest


@pytest.mark.e2e
def test_data_bin_counts(m30k):
    out, _, seconds = m30k
    assert seconds < 300, f"prepare took {seconds:.0f}s"
    for split, n in PAIRS.items():
        assert binarize.count_pairs(out / "data-bin", split, "de", "en") == n
    # and as fairseq itself reads them
    from fairseq.data import data_utils

    for split, n in PAIRS.items():
        for lang in ("de", "en"):
            ds = data_utils.load_indexed_dataset(str(out / "data-bin" / f"{split}.de-en.{lang}"), None)
            assert ds is not None and len(ds) == n
    d_de = (out / "data-bin" / "dict.de.txt").read_bytes()
    assert d_de == (out / "data-bin" / "dict.en.txt").read_bytes()
    assert (out / "spm.model").is_file() and (out / "spm.vocab").is_file()


@pytest.mark.e2e
def test_manifest(m30k):
    out = m30k[0]
    m = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
    assert (m["corpus"], m["src"], m["tgt"], m["vocab_size"]) == ("multi30k", "de", "en", 8000)
    assert m["cleaning"]["pairs_before"] == m["cleaning"]["pairs_after"] == 29000
    assert m["test_sets"] == {"test": "test_2016_flickr", "test1": "test_2017_flickr", "test2": "test_2017_mscoco"}
    for split, n in PAIRS.items():
        assert m["splits"][split]["pairs"] == n
        assert m["splits"][split]["origin"] == {"de": [f"{ORIGIN[split]}.de.gz"], "en": [f"{ORIGIN[split]}.en.gz"]}
    assert all(f["matches_known_snapshot"] for f in m["source"]["files"])
    assert m["spm"]["pieces"] == 8000 and min(m["spm"]["roundtrip_exact"].values()) == 1.0
    assert set(m["tools"]) >= {"sacremoses", "sentencepiece", "fairseq", "python"}


@pytest.mark.e2e
def test_references(m30k):
    out = m30k[0]
    for split, n in PAIRS.items():
        for lang in ("de", "en"):
            ref = out / "ref" / f"{split}.{lang}"
            if split == "train":
                assert not ref.exists()
                continue
            lines = text.read_lines(ref)
            assert len(lines) == n
            raw = text.read_lines(RAW / f"{ORIGIN[split]}.{lang}.gz")
            assert lines == [text.squash_whitespace(x) for x in raw]  # untokenised, unnormalised


@pytest.mark.e2e
def test_detokenize_round_trip(m30k):
    """What the evaluation does: pieces -> --post-process sentencepiece -> detokenize, against
    the raw reference. Reports the share of lines that come back exactly."""
    out = m30k[0]
    sp = subword.load(out / "spm.model")
    for lang in ("de", "en"):
        ref = text.read_lines(out / "ref" / f"valid.{lang}")
        tok = text.tokenize(ref, lang)
        plain = text.detokenize(tok, lang)
        via_spm = text.detokenize([subword.decode_pieces(p) for p in subword.encode(sp, tok)], lang)
        share = sum(a == b for a, b in zip(plain, ref)) / len(ref)
        share_spm = sum(a == b for a, b in zip(via_spm, ref)) / len(ref)
        print(f"\nvalid.{lang}: detokenize(tokenize(raw)) == raw for {100 * share:.2f}% "
              f"({100 * share_spm:.2f}% through sentencepiece)")
        assert share >= 0.99 and share_spm == share
        raw_tok = text.tokenize(ref, lang, normalize=False)
        assert sum(a == b for a, b in zip(text.detokenize(raw_tok, lang), ref)) / len(ref) >= 0.99


@pytest.mark.e2e
def test_rerun_is_fast_and_skips(m30k):
    out = m30k[0]
    stamp = (out / "data-bin" / "train.de-en.de.bin").stat().st_mtime_ns
    proc, seconds = run_script("--out", out, "--raw", RAW)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("extract", "tokenize", "clean", "spm", "encode", "binarize", "refs"):
        assert f"step {step}: up to date, skipped" in proc.stderr
    assert (out / "data-bin" / "train.de-en.de.bin").stat().st_mtime_ns == stamp
    # the remaining time is Python start-up and importing the package
    assert seconds < 60, seconds


@pytest.mark.e2e
def test_corrupt_gz(tmp_path):
    raw = copy_raw(tmp_path / "raw")
    f = raw / "train.de.gz"
    f.write_bytes(f.read_bytes()[:100000])
    proc, seconds = run_script("--out", tmp_path / "out", "--raw", raw)
    assert proc.returncode == 1
    assert "train.de.gz is corrupt or truncated" in proc.stderr and "error:" in proc.stderr
    assert not (tmp_path / "out" / "data-bin").exists()


def test_mismatched_sides(tmp_path, capsys):
    raw = copy_raw(tmp_path / "raw")
    lines = text.read_lines(raw / "val.en.gz")
    (raw / "val.en.gz").unlink()
    text.write_lines(raw / "val.en", lines[:-1])  # plain files are accepted too
    code = cli.main(["multi30k", "--out", str(tmp_path / "out"), "--raw", str(raw)])
    err = capsys.readouterr().err
    assert code == 1
    assert "valid (val)" in err and "1014" in err and "1013" in err and "line-parallel" in err


def test_missing_file_and_tool(tmp_path, capsys, monkeypatch):
    raw = copy_raw(tmp_path / "raw")
    (raw / "test_2017_mscoco.de.gz").unlink()
    code = cli.main(["multi30k", "--out", str(tmp_path / "o1"), "--raw", str(raw)])
    assert code == 1 and "test_2017_mscoco.de" in capsys.readouterr().err
    # without the extra test sets that file is not needed; but fairseq-preprocess is
    monkeypatch.setenv(binarize.ENV_OVERRIDE, "/nonexistent/fairseq-preprocess")
    code = cli.main(["multi30k", "--out", str(tmp_path / "o2"), "--raw", str(raw), "--extra-tests", ""])
    err = capsys.readouterr().err
    assert code == 1 and "FAIRSEQ_PREPROCESS" in err


def test_download_from_local_server(tmp_path, capsys):
    """The download path, against a local HTTP server standing in for GitHub (the real URLs
    cannot be reached from the test machines)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(RAW))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        argv = ["multi30k", "--out", str(tmp_path / "out"), "--url-base", base, "--stop-after", "extract"]
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert len(text.read_lines(tmp_path / "out" / "tmp" / "raw" / "train.de")) == 29000
        assert (tmp_path / "out" / "download" / "train.de.gz").read_bytes() == (RAW / "train.de.gz").read_bytes()
        # a dead link (404) is a clear error
        argv = ["multi30k", "--out", str(tmp_path / "out2"), "--url-base", base + "nothing/", "--stop-after", "extract"]
        assert cli.main(argv) == 1
        assert "Could not download Multi30k" in capsys.readouterr().err
    finally:
        server.shutdown()
