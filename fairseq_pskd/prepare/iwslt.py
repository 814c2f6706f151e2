"""IWSLT 2015 TED talks (WIT3 release "2015-01"), English-German.

Accepted inputs (`--raw`):
- the whole release `2015-01.tgz` (holds `2015-01/texts/<a>/<b>/<a>-<b>.tgz` for every pair),
- a per-pair archive `en-de.tgz` or `de-en.tgz` (holds `<pair>/train.tags.<pair>.<lang>` and
  `<pair>/IWSLT15.TED.<set>.<pair>.<lang>.xml`),
- a directory holding any of the above, extracted or not.
Either orientation of the pair works for either translation direction: the two archives hold
the same talks, and we only read both languages' files.

Text extraction:
- train: `train.tags.<pair>.<lang>`, minus the talk metadata lines (`<url>`, `<talkid>`,
  `<keywords>`, `<speaker>`, `<title>`, `<description>`, `<reviewer>`, `<translator>`, ...: any
  line that starts with a tag). Each language file is filtered on its own, because the sides need
  not carry the same metadata lines (e.g. <translator> only on the translated side); the
  remaining sentence lines must then be equally many.
- dev/test: the `<seg id="N">...</seg>` elements of `IWSLT15.TED.<set>.<pair>.<lang>.xml` in
  document order, XML entities unescaped, surrounding blanks stripped. The (docid, seg id)
  sequences of the two languages must be identical.
"""
from __future__ import annotations

import re
import shutil
import tarfile
import zlib
from pathlib import Path

from . import download, text
from .errors import PrepareError
from .pipeline import Source, Split

RELEASE = "2015-01"
# Per-pair archives of the WIT3 archive (reported dead in recent years).
PAIR_URL = "https://wit3.fbk.eu/archive/2015-01/texts/{a}/{b}/{a}-{b}.tgz"
# The release page https://wit3.fbk.eu/2015-01 links the whole release, 2015-01.tgz, on Google
# Drive. This file id is the one a public download script uses (with gdown); it has not been
# tested yet. confirm=t skips Drive's "cannot scan for viruses" page for large files.
RELEASE_PAGE = "https://wit3.fbk.eu/2015-01"
RELEASE_URL = (
    "https://drive.usercontent.google.com/download?id=1Mz-iiRxRqbCVbsYfKZQ6yuAxHNzYTMnI"
    "&export=download&confirm=t"
)

DEFAULT_DEV = "tst2012"
DEFAULT_TEST = "tst2013"

# A metadata line starts with an opening or closing tag: <url>, <talkid>, </description>,
# <reviewer href="...">. A sentence starting with "<3" or "< 5" is not matched.
_META_RE = re.compile(r"^\s*</?[A-Za-z][\w.:-]*(\s[^>]*)?/?>")
_DOC_RE = re.compile(r"<doc\b([^>]*)>(.*?)</doc\s*>", re.S)
_DOCID_RE = re.compile(r"""\bdocid\s*=\s*["']([^"']*)["']""")
_SEG_RE = re.compile(r"""<seg\b[^>]*?\bid\s*=\s*["']?([^"'\s>]+)["']?[^>]*>(.*?)</seg\s*>""", re.S)
_ENTITY_RE = re.compile(r"&(amp|lt|gt|quot|apos|#[0-9]+|#[xX][0-9a-fA-F]+);")
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def xml_unescape(s: str) -> str:
    """Replace the XML entities (the five named ones and numeric references) in one pass, so
    that "&amp;lt;" becomes "&lt;" and not "<"."""

    def sub(m: re.Match) -> str:
        e = m.group(1)
        if e in _ENTITIES:
            return _ENTITIES[e]
        try:
            return chr(int(e[2:], 16) if e[1] in "xX" else int(e[1:]))
        except (ValueError, OverflowError):
            return m.group(0)

    return _ENTITY_RE.sub(sub, s)


def drop_metadata(lines: list[str]) -> list[str]:
    """The sentence lines of a train.tags file."""
    return [line for line in lines if not _META_RE.match(line)]


def parse_segments(xml: str) -> list[tuple[str, str, str]]:
    """[(docid, seg id, text)] of an IWSLT/mteval XML file, in file order."""
    out = []
    docs = _DOC_RE.findall(xml)
    if not docs:  # tolerate files without <doc> wrappers
        docs = [("", xml)]
    for attrs, body in docs:
        m = _DOCID_RE.search(attrs)
        docid = m.group(1) if m else ""
        for segid, seg in _SEG_RE.findall(body):
            out.append((docid, segid, xml_unescape(seg).strip()))
    return out


def _bad_archive(path: Path, e: Exception) -> PrepareError:
    return PrepareError(
        f"{path} is not a readable .tgz archive, or it is truncated ({type(e).__name__}: {e}). "
        "Delete it and download it again (or pass a good copy with --raw)."
    )


class IWSLT15Source(Source):
    corpus = "iwslt15"
    description = "IWSLT 2015 TED talks (WIT3 release 2015-01), https://wit3.fbk.eu/2015-01"

    def __init__(
        self,
        src: str,
        tgt: str,
        raw: Path | None,
        download_dir: Path,
        dev: str = DEFAULT_DEV,
        test: str = DEFAULT_TEST,
        extra_tests=(),
        url: str | None = None,
        sha256: str | None = None,
    ):
        self.src, self.tgt = src, tgt
        self.raw = Path(raw).resolve() if raw else None
        self.download_dir = Path(download_dir)
        self.url = url
        self.sha256 = sha256.lower() if sha256 else None
        # "+" joins several sets into one split, e.g. --dev dev2010+tst2010
        self.splits = [Split("train", "train.tags"), Split("valid", dev), Split("test", test)]
        for i, name in enumerate(extra_tests, 1):
            self.splits.append(Split(f"test{i}", name))
        self.pairs = [f"{src}-{tgt}", f"{tgt}-{src}"]  # preferred orientation first

    # --- identity and early checks -----------------------------------------------------------

    def check(self) -> None:
        if self.raw is not None and not self.raw.exists():
            raise PrepareError(f"--raw {self.raw} does not exist")
        if self.raw is not None and self.raw.is_dir() and self.sha256:
            raise PrepareError("--sha256 checks an archive; --raw names a directory")

    def _candidate_urls(self) -> list[tuple[str, str]]:
        if self.url:
            name = self.url.rstrip("/").split("/")[-1].split("?")[0] or "iwslt15.tgz"
            return [(self.url, name if name.endswith((".tgz", ".tar.gz")) else name + ".tgz")]
        urls = [(PAIR_URL.format(a=a, b=b), f"{a}-{b}.tgz") for a, b in
                (p.split("-") for p in self.pairs)]  # fmt: skip
        return urls + [(RELEASE_URL, f"{RELEASE}.tgz")]

    def fingerprint(self) -> dict:
        self.check()
        if self.raw is None:
            return {"download": self._candidate_urls(), "sha256": self.sha256}
        if self.raw.is_file():
            st = self.raw.stat()
            return {"raw": str(self.raw), "size": st.st_size, "mtime": st.st_mtime_ns,
                    "sha256": self.sha256}  # fmt: skip
        files = []
        for p in sorted(self.raw.rglob("*")):
            if p.is_file() and (p.name.startswith(("train.tags.", "IWSLT")) or p.suffix == ".tgz"):
                st = p.stat()
                files.append([str(p.relative_to(self.raw)), st.st_size, st.st_mtime_ns])
        return {"raw": str(self.raw), "files": files}

    # --- getting at the files ----------------------------------------------------------------

    def _download(self, log) -> tuple[Path, dict]:
        errors = []
        for url, name in self._candidate_urls():
            dest = self.download_dir / name
            if dest.is_file():
                log(f"  using the earlier download {dest}")
                return dest, {"url": url, "file": str(dest), "sha256": download.sha256_file(dest)}
            log(f"  downloading {url}")
            try:
                sha = download.fetch(url, dest, log)
            except PrepareError as e:
                log(f"  failed: {e}")
                errors.append(str(e))
                continue
            return dest, {"url": url, "file": str(dest), "sha256": sha}
        raise PrepareError(
            "could not download the IWSLT 2015 release:\n  " + "\n  ".join(errors) + "\n"
            f"Download 2015-01.tgz from {RELEASE_PAGE} (or a per-pair en-de.tgz / de-en.tgz) "
            "by hand and pass it with --raw PATH."
        )

    def _find_pair_dir(self, root: Path) -> tuple[Path, str] | None:
        """A directory below root with both train.tags.<pair>.<lang> files; None if none."""
        for pair in self.pairs:
            for f in sorted(root.rglob(f"train.tags.{pair}.*")):
                d = f.parent
                missing = [
                    f"train.tags.{pair}.{lang}" for lang in (self.src, self.tgt)
                    if not (d / f"train.tags.{pair}.{lang}").is_file()
                ]  # fmt: skip
                if missing:
                    raise PrepareError(
                        f"{d} has {f.name} but not {', '.join(missing)}: the release is "
                        "incomplete; extract or download it again"
                    )
                return d, pair
        return None

    def _extract_tar(self, archive: Path, dest: Path, log) -> None:
        """Copy the members we need out of a (possibly huge) tgz in one sequential pass.

        Members are written under their base name (dest/<name>), never under the stored path,
        so an archive cannot write outside dest. Reading to the end of the gzip stream also
        verifies its CRC, so a truncated download is caught here and not half-way through.
        """
        alternatives = "|".join(map(re.escape, self.pairs))
        wanted = re.compile(
            r"(?:^|/)(?:train\.tags\.(?:%s)\.[a-z]+|IWSLT\d*\.TED\.[^/]*\.(?:%s)\.[a-z]+\.xml"
            r"|(?:%s)\.tgz)$"
            % ((alternatives,) * 3)
        )
        dest.mkdir(parents=True, exist_ok=True)
        n = 0
        try:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf:
                    if m.isfile() and wanted.search(m.name):
                        fh = tf.extractfile(m)
                        assert fh is not None
                        (dest / Path(m.name).name).write_bytes(fh.read())
                        n += 1
                if hasattr(tf.fileobj, "read"):
                    while tf.fileobj.read(1 << 20):  # drain: checks the gzip trailer
                        pass
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise _bad_archive(archive, e) from e
        log(f"  extracted {n} files from {archive.name}")

    def _locate(self, path: Path, work: Path, log, depth: int = 0) -> tuple[Path, str]:
        """(directory with the pair's files, pair name) for a directory or archive."""
        if depth > 2:
            raise PrepareError(f"{path}: archives nested too deep; is this the IWSLT release?")
        if path.is_dir():
            found = self._find_pair_dir(path)
            if found:
                return found
            for pair in self.pairs:
                inner = sorted(path.rglob(f"{pair}.tgz"))
                if inner:
                    return self._locate(inner[0], work, log, depth + 1)
            raise PrepareError(
                f"{path} holds no train.tags.{self.pairs[0]}.{self.src} (nor the "
                f"{self.pairs[1]} files) and no {self.pairs[0]}.tgz / {self.pairs[1]}.tgz; "
                f"is this the IWSLT 2015 release ({RELEASE_PAGE})?"
            )
        dest = work / "extract" / f"{depth}-{path.name.split('.')[0]}"
        self._extract_tar(path, dest, log)
        found = self._find_pair_dir(dest)
        if found:
            return found
        for pair in self.pairs:
            if (dest / f"{pair}.tgz").is_file():
                return self._locate(dest / f"{pair}.tgz", work, log, depth + 1)
        raise PrepareError(
            f"{path} holds neither train.tags.{self.pairs[0]}.* nor "
            f"texts/{self.src}/{self.tgt}/{self.pairs[0]}.tgz (or the {self.pairs[1]} ones); is "
            f"it the IWSLT 2015 release ({RELEASE_PAGE})? For a missing training file: the "
            "archive is incomplete, download it again."
        )

    # --- the text ----------------------------------------------------------------------------

    def _xml_file(self, d: Path, pair: str, name: str, lang: str) -> Path:
        exact = d / f"IWSLT15.TED.{name}.{pair}.{lang}.xml"
        if exact.is_file():
            return exact
        other = sorted(d.glob(f"IWSLT*.TED.{name}.{pair}.{lang}.xml"))  # e.g. IWSLT14 names
        if other:
            return other[-1]
        have = sorted({p.name.split(".")[2] for p in d.glob(f"IWSLT*.TED.*.{pair}.{lang}.xml")})
        raise PrepareError(
            f"no IWSLT15.TED.{name}.{pair}.{lang}.xml in {d}; sets available there: "
            f"{', '.join(have) or 'none'} (choose with --dev / --test / --extra-tests)"
        )

    def extract(self, workdir: Path, log):
        source = {"release": RELEASE, "raw": str(self.raw) if self.raw else None}
        archive = None
        if self.raw is None:
            archive, dl = self._download(log)
            source["download"] = dl
        elif self.raw.is_file():
            archive = self.raw
        if archive is not None:
            sha = download.sha256_file(archive)
            source["archive"] = str(archive)
            source["sha256"] = sha
            source["sha256_verified"] = download.check_sha256(
                archive, sha, self.sha256, log, "the IWSLT 2015 release"
            )
        # files of an earlier, different input must not be picked up
        shutil.rmtree(workdir / "extract", ignore_errors=True)
        d, pair = self._locate(archive or self.raw, workdir, log)
        source["pair_files"] = pair
        log(f"  reading the {pair} files in {d}")

        texts = {}
        langs = (self.src, self.tgt)
        train = self.splits[0]
        texts["train"] = {}
        for lang in langs:
            f = d / f"train.tags.{pair}.{lang}"
            lines = text.read_lines(f)
            kept = drop_metadata(lines)
            log(f"  {f.name}: {len(kept)} sentences ({len(lines) - len(kept)} metadata lines)")
            texts["train"][lang] = kept
            train.origin[lang] = [f.name]

        for s in self.splits[1:]:
            texts[s.name] = {lang: [] for lang in langs}
            for name in s.label.split("+"):
                segs = {}
                for lang in langs:
                    f = self._xml_file(d, pair, name, lang)
                    try:
                        xml = text.read_bytes(f).decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise PrepareError(f"{f} is not valid UTF-8 ({e})") from e
                    segs[lang] = parse_segments(xml)
                    s.origin.setdefault(lang, []).append(f.name)
                ids = {lang: [(doc, sid) for doc, sid, _ in segs[lang]] for lang in langs}
                if ids[self.src] != ids[self.tgt]:
                    # the generic check would only compare counts; say where they part
                    a, b = ids[self.src], ids[self.tgt]
                    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    raise PrepareError(
                        f"{name}: the {self.src} and {self.tgt} XML files do not hold the same "
                        f"segments ({len(a)} vs {len(b)}; first difference at segment #{i + 1}: "
                        f"{a[i] if i < len(a) else 'end'} vs {b[i] if i < len(b) else 'end'})"
                    )
                for lang in langs:
                    texts[s.name][lang].extend(t for _, _, t in segs[lang])
        return texts, source
