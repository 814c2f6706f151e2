"""IWSLT'15 preparation on a small fake release in the official format.

The real release cannot be downloaded from the test machines, so the archive is built here:
train.tags.<pair>.<lang> with talk metadata lines, IWSLT15.TED.<set>.<pair>.<lang>.xml with
<doc>/<seg> elements, packed as a per-pair tgz, as the whole-release tgz
(2015-01/texts/<a>/<b>/<a>-<b>.tgz inside) and as a plain directory.

Full runs (up to fairseq-preprocess) are done twice, once through the shell script; the other
cases stop after extraction (--stop-after extract) or fail before it, and run in-process, to
keep the file at about a minute.
"""
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, run

from fairseq_pskd.prepare import binarize, cli, iwslt, text

SCRIPT = REPO / "scripts" / "prepare-iwslt15.sh"
SETS = ["dev2010", "tst2010", "tst2011", "tst2012", "tst2013"]
TINY = ["--vocab-size", "150", "--workers", "1"]

# ---------------------------------------------------------------------------------------------
# the fake release
# ---------------------------------------------------------------------------------------------

TOPICS = [
    ("music", "Musik"), ("the ocean", "den Ozean"), ("bees", "Bienen"), ("cities", "Städte"),
    ("language", "Sprache"), ("the brain", "das Gehirn"), ("water", "Wasser"), ("time", "Zeit"),
]


def _talk_sentences(talk: int):
    """(en, de) sentence pairs of one talk; a few carry characters that matter."""
    pairs = []
    for i in range(12):
        en_t, de_t = TOPICS[(talk * 3 + i) % len(TOPICS)]
        pairs.append((f"In talk {talk}, sentence {i} is about {en_t}, isn't it?",
                      f"In Vortrag {talk} geht es in Satz {i} um {de_t}, nicht wahr?"))
    pairs.append(("Tom & Jerry said \"hello\" (Laughter)", "Tom & Jerry sagten „hallo“ (Lachen)"))
    pairs.append(("<3 is a heart, and 5 < 7.", "<3 ist ein Herz, und 5 < 7."))
    return pairs


def _metadata(talk: int, lang: str):
    meta = [
        f"<url>http://www.ted.com/talks/speaker_{talk}_talk_title</url>",
        f"<keywords>talks, science, {lang}</keywords>",
        f"<speaker>Speaker {talk}</speaker>",
        f"<talkid>{1000 + talk}</talkid>",
        f"<title>Speaker {talk}: A talk ({lang})</title>",
        f"<description>TED Talk Subtitles and Transcript: talk {talk} in {lang}.</description>",
    ]
    if lang == "de":  # only the translated side names translator and reviewer
        meta += [f'<reviewer href="http://www.ted.com/profiles/{talk}">Reviewer {talk}</reviewer>',
                 f'<translator href="http://www.ted.com/profiles/9{talk}">Translator {talk}</translator>']
    return meta


# The extra pair dropped by the default cleaning (ratio 14 > 1.5).
RATIO_PAIR = ("Yes.", "Ja, das ist natürlich vollkommen richtig und ich stimme Ihnen da zu.")


def _segments(set_name: str):
    """[(docid, [(en, de)])] of one dev/test set; the text shows entities and odd spacing."""
    docs = []
    for d in range(2):
        segs = [(f"{set_name} doc {d} segment {k} is here.", f"{set_name} Dok {d} Segment {k} ist hier.")
                for k in range(1, 4)]
        segs.append((f"{set_name} {d}: A &amp; B &lt;tag&gt; &quot;q&quot; it&#39;s",
                     f"{set_name} {d}: A &amp; B &lt;Tag&gt; &quot;Z&quot; es&#x27;s"))
        docs.append((str(1500 + 10 * SETS.index(set_name) + d), segs))
    return docs


def expected_sets():
    """{set: {lang: [unescaped segment text in file order]}}"""
    out = {}
    for s in SETS:
        out[s] = {"en": [], "de": []}
        for _, segs in _segments(s):
            for en, de in segs:
                out[s]["en"].append(iwslt.xml_unescape(en))
                out[s]["de"].append(iwslt.xml_unescape(de))
    return out


def expected_train():
    pairs = [p for talk in range(3) for p in _talk_sentences(talk)] + [RATIO_PAIR]
    return {"en": [p[0] for p in pairs], "de": [p[1] for p in pairs]}


def write_pair_dir(root: Path, a: str = "en", b: str = "de", drop_train_line: bool = False) -> Path:
    """Write the files of the <a>-<b> per-pair archive under root/<a>-<b>/."""
    pair = f"{a}-{b}"
    d = root / pair
    d.mkdir(parents=True, exist_ok=True)
    names = {"en": "english", "de": "german"}
    for lang in (a, b):
        lines = []
        for talk in range(3):
            lines += _metadata(talk, lang)
            lines += [en if lang == "en" else de for en, de in _talk_sentences(talk)]
        lines.append(RATIO_PAIR[0] if lang == "en" else RATIO_PAIR[1])
        if drop_train_line and lang == b:
            del lines[-3]
        (d / f"train.tags.{pair}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for s in SETS:
            if lang == a:
                head = f'<srcset setid="iwslt2015-{s}" srclang="{names[a]}">'
                tail = "</srcset>"
            else:
                head = (f'<refset setid="iwslt2015-{s}" srclang="{names[a]}" trglang="{names[b]}" '
                        'refid="ref">')
                tail = "</refset>"
            xml = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", head]
            for docid, segs in _segments(s):
                xml += [f'<doc docid="{docid}" genre="lectures">',
                        f"<url>http://www.ted.com/talks/doc_{docid}</url>",
                        "<description>TED Talk Subtitles and Transcript: a talk.</description>",
                        "<keywords>talks</keywords>", f"<talkid>{docid}</talkid>",
                        f"<title>Talk {docid}</title>"]
                for k, (en, de) in enumerate(segs, 1):
                    xml.append(f'<seg id="{k}"> {en if lang == "en" else de} </seg>')
                xml.append("</doc>")
            xml += [tail, "</mteval>"]
            (d / f"IWSLT15.TED.{s}.{pair}.{lang}.xml").write_text("\n".join(xml) + "\n", encoding="utf-8")
    return d


def pack_pair_tgz(pair_dir: Path, dest: Path, skip=()) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        for f in sorted(pair_dir.iterdir()):
            if f.name not in skip:
                tf.add(f, arcname=f"{pair_dir.name}/{f.name}")
    return dest


def pack_release_tgz(pair_tgzs: dict, dest: Path) -> Path:
    """2015-01.tgz layout: 2015-01/texts/<a>/<b>/<a>-<b>.tgz"""
    with tarfile.open(dest, "w:gz") as tf:
        for pair, tgz in pair_tgzs.items():
            a, b = pair.split("-")
            tf.add(tgz, arcname=f"2015-01/texts/{a}/{b}/{pair}.tgz")
        info = tarfile.TarInfo("2015-01/README")
        data = b"WIT3 release 2015-01\n"
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return dest


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("iwslt_release")
    en_de = write_pair_dir(root / "dirs", "en", "de")
    de_en = write_pair_dir(root / "dirs", "de", "en")
    fr = write_pair_dir(root / "decoy", "en", "de")  # content of a pair we must not pick
    fr = fr.rename(fr.parent / "en-fr")
    pair_tgz = pack_pair_tgz(en_de, root / "en-de.tgz")
    de_en_tgz = pack_pair_tgz(de_en, root / "de-en.tgz")
    decoy = pack_pair_tgz(fr, root / "en-fr.tgz")
    whole = pack_release_tgz({"en-de": pair_tgz, "de-en": de_en_tgz, "en-fr": decoy}, root / "2015-01.tgz")
    return {"root": root, "dir": root / "dirs", "pair_tgz": pair_tgz, "de_en_tgz": de_en_tgz, "whole": whole}


def run_inprocess(capsys, *argv):
    code = cli.main(["iwslt15", *map(str, argv)])
    err = capsys.readouterr().err
    return code, err


def run_script(*argv):
    """scripts/prepare-iwslt15.sh ARGV, outside any virtual environment it would otherwise pick:
    a CompletedProcess with stdout and stderr apart, whatever its exit status."""
    return run(["bash", SCRIPT, *argv], check=False, env={"VIRTUAL_ENV": None}, stderr=subprocess.PIPE)


def check_extracted(out: Path, src: str, tgt: str, dev="tst2012", test="tst2013"):
    train, sets = expected_train(), expected_sets()
    for lang in (src, tgt):
        assert text.read_lines(out / "tmp" / "raw" / f"train.{lang}") == train[lang]
        assert text.read_lines(out / "tmp" / "raw" / f"valid.{lang}") == sets[dev][lang]
        assert text.read_lines(out / "tmp" / "raw" / f"test.{lang}") == sets[test][lang]


# ---------------------------------------------------------------------------------------------
# parsing units
# ---------------------------------------------------------------------------------------------


def test_drop_metadata_keeps_sentences_starting_with_lt():
    lines = ["<url>http://x</url>", "<talkid>1</talkid>", "Hello.", "<3 you", "< 5 items",
             '<reviewer href="x">R</reviewer>', "</description>", "  <title>T</title>", "Bye."]
    assert iwslt.drop_metadata(lines) == ["Hello.", "<3 you", "< 5 items", "Bye."]


def test_xml_unescape_is_single_pass():
    assert iwslt.xml_unescape("a &amp;lt; b &lt; c &#39;d&#x27; &quot;e&quot; &nbsp;") == \
        "a &lt; b < c 'd' \"e\" &nbsp;"


def test_parse_segments_order_and_docids():
    xml = ('<mteval><refset><doc docid="7" genre="lectures"><talkid>7</talkid>\n'
           '<seg id="1"> one &amp; </seg>\n<seg id="2">two\n lines</seg></doc>\n'
           '<doc docid="3"><seg id="1">three</seg></doc></refset></mteval>')
    assert iwslt.parse_segments(xml) == [("7", "1", "one &"), ("7", "2", "two\n lines"), ("3", "1", "three")]


# ---------------------------------------------------------------------------------------------
# full runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_run(release, tmp_path_factory):
    """en->de from the per-pair en-de.tgz, through the shell script."""
    out = tmp_path_factory.mktemp("iwslt_pair") / "out"
    proc = run_script("--out", out, "--raw", release["pair_tgz"], "--extra-tests", "tst2011,dev2010", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.e2e
def test_pair_tgz_en_de(pair_run, release):
    out, proc = pair_run
    check_extracted(out, "en", "de")
    train, sets = expected_train(), expected_sets()
    m = json.loads((out / "prepare.json").read_text())
    assert (m["corpus"], m["src"], m["tgt"]) == ("iwslt15", "en", "de")
    n_train = len(train["en"]) - 1  # RATIO_PAIR is cleaned away
    assert m["cleaning"]["pairs_before"] == len(train["en"]) and m["cleaning"]["pairs_after"] == n_train
    expect = {"train": n_train, "valid": len(sets["tst2012"]["en"]), "test": len(sets["tst2013"]["en"]),
              "test1": len(sets["tst2011"]["en"]), "test2": len(sets["dev2010"]["en"])}
    for split, n in expect.items():
        assert binarize.count_pairs(out / "data-bin", split, "en", "de") == n
        assert m["splits"][split]["pairs"] == n
    assert m["test_sets"] == {"test": "tst2013", "test1": "tst2011", "test2": "dev2010"}
    assert m["splits"]["valid"]["origin"]["de"] == ["IWSLT15.TED.tst2012.en-de.de.xml"]
    # references: raw text, entities unescaped, in segment order
    for split, s in (("valid", "tst2012"), ("test", "tst2013"), ("test1", "tst2011"), ("test2", "dev2010")):
        for lang in ("en", "de"):
            assert text.read_lines(out / "ref" / f"{split}.{lang}") == sets[s][lang]
    assert 'tst2013 1: A & B <Tag> "Z" es\'s' in text.read_lines(out / "ref" / "test.de")
    # checksum: recorded, not claimed
    assert m["source"]["sha256"] == hashlib.sha256(release["pair_tgz"].read_bytes()).hexdigest()
    assert m["source"]["sha256_verified"] is False
    assert "could not be verified" in proc.stderr
    assert (out / "data-bin" / "dict.en.txt").read_bytes() == (out / "data-bin" / "dict.de.txt").read_bytes()
    assert (out / "spm.model").is_file() and (out / "spm.vocab").is_file()


@pytest.mark.e2e
def test_whole_release_de_en_and_option_change(release, tmp_path, capsys):
    """de->en from 2015-01.tgz (uses the de-en archive inside); then a vocabulary change
    re-runs sentencepiece and what follows, but not extraction or tokenisation."""
    out = tmp_path / "out"
    code, err = run_inprocess(capsys, "--out", out, "--raw", release["whole"], "--src", "de", "--tgt", "en", *TINY)
    assert code == 0, err[-3000:]
    check_extracted(out, "de", "en")
    m = json.loads((out / "prepare.json").read_text())
    assert m["source"]["pair_files"] == "de-en"
    assert m["splits"]["train"]["origin"]["en"] == ["train.tags.de-en.en"]
    assert binarize.count_pairs(out / "data-bin", "train", "de", "en") == len(expected_train()["de"]) - 1
    assert (out / "ref" / "test.en").is_file() and (out / "ref" / "test.de").is_file()
    assert not list((out / "tmp" / "extract").rglob("*en-fr*"))  # the decoy pair stayed packed

    code, err = run_inprocess(capsys, "--out", out, "--raw", release["whole"], "--src", "de", "--tgt", "en",
                              "--vocab-size", "120", "--workers", "1")
    assert code == 0, err[-3000:]
    for step in ("extract", "tokenize", "clean", "refs"):
        assert f"step {step}: up to date, skipped" in err
    for step in ("spm", "encode", "binarize"):
        assert f"step {step}: running" in err
    assert json.loads((out / "prepare.json").read_text())["vocab_size"] == 120


@pytest.mark.e2e
def test_train_size_subset(release, tmp_path, capsys):
    """--train-size N: a seeded random subset of N cleaned training pairs, in corpus order, that
    sentencepiece and fairseq-preprocess see (dev and test untouched), recorded in the manifest;
    another seed draws another subset, and more pairs than there are is refused."""
    out = tmp_path / "out"
    n_clean = len(expected_train()["en"]) - 1  # RATIO_PAIR is cleaned away
    code, err = run_inprocess(capsys, "--out", out, "--raw", release["pair_tgz"], "--train-size", 20, *TINY)
    assert code == 0, err[-3000:]
    tok = {lang: text.read_lines(out / "tmp" / "tok" / f"train.{lang}") for lang in ("en", "de")}
    sub = {lang: text.read_lines(out / "tmp" / "clean" / f"train.{lang}") for lang in ("en", "de")}
    pairs = list(zip(tok["en"], tok["de"]))
    # a subsequence of the tokenised pairs: real pairs, each drawn once, in corpus order
    rest = iter(range(len(pairs)))
    positions = [next(i for i in rest if pairs[i] == p) for p in zip(sub["en"], sub["de"])]
    assert len(positions) == 20 and len(pairs) - 1 not in positions  # RATIO_PAIR was cleaned first
    assert "on 2 x 20 lines" in err  # sentencepiece learned on the subset
    assert binarize.count_pairs(out / "data-bin", "train", "en", "de") == 20
    assert binarize.count_pairs(out / "data-bin", "test", "en", "de") == len(expected_sets()["tst2013"]["en"])
    m = json.loads((out / "prepare.json").read_text())
    assert m["splits"]["train"]["pairs"] == m["cleaning"]["pairs_after"] == 20
    assert (m["cleaning"]["train_size"], m["cleaning"]["train_size_seed"]) == (20, 1)
    assert m["cleaning"]["pairs_cleaned"] == n_clean

    # the same seed draws the same pairs; another seed re-runs cleaning on, not tokenisation
    first = sub["en"]
    code, err = run_inprocess(capsys, "--out", out, "--raw", release["pair_tgz"], "--train-size", 20,
                              "--train-size-seed", 2, *TINY)
    assert code == 0, err[-3000:]
    assert "step tokenize: up to date, skipped" in err and "step clean: running" in err
    second = text.read_lines(out / "tmp" / "clean" / "train.en")
    assert len(second) == 20 and second != first
    assert json.loads((out / "prepare.json").read_text())["cleaning"]["train_size_seed"] == 2
    assert text.random_subset([True] * n_clean, 20, 1) == text.random_subset([True] * n_clean, 20, 1)

    code, err = run_inprocess(capsys, "--out", out, "--raw", release["pair_tgz"], "--train-size",
                              n_clean + 1, *TINY)
    assert code == 1
    assert f"--train-size {n_clean + 1} is more than the {n_clean} training pairs left after cleaning" in err


def test_directory_and_other_orientation(release, tmp_path, capsys):
    # an extracted folder (holding en-de/ and de-en/): en->de picks the en-de files
    code, err = run_inprocess(capsys, "--out", tmp_path / "a", "--raw", release["dir"], "--stop-after", "extract",
                              *TINY)
    assert code == 0, err
    check_extracted(tmp_path / "a", "en", "de")
    # de->en from the en-de archive only: the other orientation's files are used
    code, err = run_inprocess(capsys, "--out", tmp_path / "b", "--raw", release["pair_tgz"], "--src", "de",
                              "--tgt", "en", "--dev", "dev2010+tst2010", "--stop-after", "extract", *TINY)
    assert code == 0, err
    sets = expected_sets()
    assert text.read_lines(tmp_path / "b" / "tmp" / "raw" / "valid.en") == sets["dev2010"]["en"] + sets["tst2010"]["en"]
    # an unpacked release folder with the per-pair tgz still packed
    d = tmp_path / "release" / "2015-01" / "texts" / "en" / "de"
    d.mkdir(parents=True)
    shutil.copy(release["pair_tgz"], d / "en-de.tgz")
    code, err = run_inprocess(capsys, "--out", tmp_path / "c", "--raw", tmp_path / "release",
                              "--stop-after", "extract", *TINY)
    assert code == 0, err
    check_extracted(tmp_path / "c", "en", "de")


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_corrupt_archives(release, tmp_path, capsys):
    data = release["pair_tgz"].read_bytes()
    truncated = tmp_path / "en-de.tgz"
    truncated.write_bytes(data[: len(data) // 2])
    code, err = run_inprocess(capsys, "--out", tmp_path / "o1", "--raw", truncated, *TINY)
    assert code == 1 and "truncated" in err and "en-de.tgz" in err
    garbage = tmp_path / "2015-01.tgz"
    garbage.write_bytes(b"<html>Not found</html>\n" * 10)
    code, err = run_inprocess(capsys, "--out", tmp_path / "o2", "--raw", garbage, *TINY)
    assert code == 1 and "not a readable .tgz" in err


@pytest.mark.e2e
def test_corrupt_archive_through_script(release, tmp_path):
    data = release["whole"].read_bytes()
    bad = tmp_path / "2015-01.tgz"
    bad.write_bytes(data[:-200])  # cut in the last member / gzip trailer
    proc = run_script("--out", tmp_path / "o", "--raw", bad, *TINY)
    assert proc.returncode == 1, proc.stderr
    assert "error:" in proc.stderr and "download it again" in proc.stderr


def test_missing_train_file(release, tmp_path, capsys):
    tgz = pack_pair_tgz(release["dir"] / "en-de", tmp_path / "en-de.tgz", skip={"train.tags.en-de.de"})
    code, err = run_inprocess(capsys, "--out", tmp_path / "o", "--raw", tgz, *TINY)
    assert code == 1 and "train.tags.en-de.de" in err


def test_missing_set(release, tmp_path, capsys):
    code, err = run_inprocess(capsys, "--out", tmp_path / "o", "--raw", release["pair_tgz"],
                              "--extra-tests", "tst2014", *TINY)
    assert code == 1 and "tst2014" in err and "tst2013" in err  # says what is available


def test_mismatched_line_counts(tmp_path, capsys):
    d = write_pair_dir(tmp_path / "raw", "en", "de", drop_train_line=True)
    code, err = run_inprocess(capsys, "--out", tmp_path / "o", "--raw", d, *TINY)
    assert code == 1 and "line-parallel" in err and "train.tags.en-de.de" in err
    # dev/test: segments that do not correspond
    d = write_pair_dir(tmp_path / "raw2", "en", "de")
    f = d / "IWSLT15.TED.tst2013.en-de.de.xml"
    f.write_text(f.read_text(encoding="utf-8").replace('<seg id="2">', '<seg id="9">', 1), encoding="utf-8")
    code, err = run_inprocess(capsys, "--out", tmp_path / "o2", "--raw", d, *TINY)
    assert code == 1 and "tst2013" in err and "do not hold the same segments" in err


def test_sha256_option(release, tmp_path, capsys):
    good = hashlib.sha256(release["pair_tgz"].read_bytes()).hexdigest()
    code, err = run_inprocess(capsys, "--out", tmp_path / "o1", "--raw", release["pair_tgz"], "--sha256", good,
                              "--stop-after", "extract", *TINY)
    assert code == 0 and "verified" in err
    code, err = run_inprocess(capsys, "--out", tmp_path / "o2", "--raw", release["pair_tgz"], "--sha256", "0" * 64,
                              "--stop-after", "extract", *TINY)
    assert code == 1 and "--sha256" in err


def test_missing_fairseq_preprocess(release, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(binarize.ENV_OVERRIDE, str(tmp_path / "no-such-fairseq-preprocess"))
    code, err = run_inprocess(capsys, "--out", tmp_path / "o", "--raw", release["pair_tgz"], *TINY)
    assert code == 1 and "FAIRSEQ_PREPROCESS" in err
    assert not (tmp_path / "o" / "tmp" / "raw").exists()  # failed before doing any work


def test_gz_reader_rejects_truncation(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(("line\n" * 10000).encode())[:-100])
    with pytest.raises(text.PrepareError, match="truncated"):
        text.read_lines(p)


def test_download_from_local_server(release, tmp_path, capsys):
    """--url against a local HTTP server (the tests do not depend on the real WIT3 URLs): the
    sha256 of the download is recorded, an HTML answer is rejected."""
    import functools
    import http.server
    import threading

    (release["root"] / "page.tgz").write_text("<html>moved</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(release["root"]))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        code, err = run_inprocess(capsys, "--out", tmp_path / "o", "--url", base + "en-de.tgz",
                                  "--stop-after", "extract", *TINY)
        assert code == 0, err
        check_extracted(tmp_path / "o", "en", "de")
        m = json.loads((tmp_path / "o" / "tmp" / "done" / "extract.json").read_text())["payload"]
        assert m["download"]["sha256"] == hashlib.sha256(release["pair_tgz"].read_bytes()).hexdigest()
        assert "could not be verified" in err
        code, err = run_inprocess(capsys, "--out", tmp_path / "o2", "--url", base + "page.tgz", *TINY)
        assert code == 1 and "did not return a gzip file" in err and "--raw" in err
    finally:
        server.shutdown()
