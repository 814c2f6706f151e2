"""Multi30k task 1 (Elliott et al. 2016): image captions, English-German (also fr, cs).

Input: the gzipped raw files of the official repository, https://github.com/multi30k/dataset,
`data/task1/raw/<prefix>.<lang>.gz`, either downloaded or from a local directory (`--raw`),
which may hold the .gz files or decompressed copies (<prefix>.<lang>).

Splits: train -> train, val -> valid, test_2016_flickr -> test, and by default the extra test
sets test_2017_flickr -> test1, test_2017_mscoco -> test2 (fairseq names its --testpref list
test, test1, test2, ...). The mapping is recorded in prepare.json.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from . import download, text
from .errors import PrepareError
from .pipeline import Source, Split

URL_BASE = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"

# md5 of the *decompressed* files of the Multi30k repository at commit
# a3d2e0d26b56f3846f66a952536ffed4e401d05a. Used to say in the manifest
# whether the input is that exact snapshot; a mismatch is only a warning (upstream may fix
# typos), not an error.
KNOWN_MD5 = {
    ("train", "de"): "d3b4bc1671cfb805267f97f16884beba",
    ("train", "en"): "053a34ece7c904dbc8c7361799afbe4c",
    ("val", "de"): "9f139b15d9d11936dea7af2904e57d8c",
    ("val", "en"): "2234730e7925354b766681b029b347ec",
    ("test_2016_flickr", "de"): "cde61d7401b116652ee84099c7858ca3",
    ("test_2016_flickr", "en"): "2022a6c31e2418047a0511333d55ed42",
    ("test_2017_flickr", "de"): "798e7b25ccbaab6767b20f9b4cec6901",
    ("test_2017_flickr", "en"): "956eb7b4f31dd4b8f39b4e74756ebd11",
    ("test_2017_mscoco", "de"): "ab02abcdf97edbf8ea33e34863a46a81",
    ("test_2017_mscoco", "en"): "9136efc03561305aedd74be5c0eedb2e",
}

DEFAULT_VALID = "val"
DEFAULT_TEST = "test_2016_flickr"
DEFAULT_EXTRA_TESTS = ("test_2017_flickr", "test_2017_mscoco")


class Multi30kSource(Source):
    corpus = "multi30k"
    description = "Multi30k task 1 (Elliott et al., 2016), https://github.com/multi30k/dataset"

    def __init__(
        self,
        src: str,
        tgt: str,
        raw: Path | None,
        download_dir: Path,
        valid: str = DEFAULT_VALID,
        test: str = DEFAULT_TEST,
        extra_tests=DEFAULT_EXTRA_TESTS,
        url_base: str = URL_BASE,
    ):
        self.src, self.tgt = src, tgt
        self.raw = Path(raw).resolve() if raw else None
        self.download_dir = Path(download_dir)
        self.url_base = url_base if url_base.endswith("/") else url_base + "/"
        self.splits = [Split("train", "train"), Split("valid", valid), Split("test", test)]
        for i, name in enumerate(extra_tests, 1):
            self.splits.append(Split(f"test{i}", name))

    def _local_file(self, prefix: str, lang: str) -> Path:
        assert self.raw is not None
        for cand in (self.raw / f"{prefix}.{lang}.gz", self.raw / f"{prefix}.{lang}"):
            if cand.is_file():
                return cand
        raise PrepareError(
            f"{self.raw} has neither {prefix}.{lang}.gz nor {prefix}.{lang}; point --raw to a "
            "copy of data/task1/raw of https://github.com/multi30k/dataset"
        )

    def check(self) -> None:
        if self.raw is not None:
            if not self.raw.is_dir():
                raise PrepareError(f"--raw {self.raw} is not a directory")
            for s in self.splits:
                for lang in (self.src, self.tgt):
                    self._local_file(s.label, lang)

    def fingerprint(self) -> dict:
        if self.raw is None:
            return {"download": self.url_base}
        self.check()
        fp = {"raw": str(self.raw), "files": []}
        for s in self.splits:
            for lang in (self.src, self.tgt):
                p = self._local_file(s.label, lang)
                st = p.stat()
                fp["files"].append([p.name, st.st_size, st.st_mtime_ns])
        return fp

    def extract(self, workdir: Path, log):
        texts, files_info, mismatched = {}, [], []
        for s in self.splits:
            texts[s.name] = {}
            for lang in (self.src, self.tgt):
                name = f"{s.label}.{lang}.gz"
                entry = {"file": name}
                if self.raw is not None:
                    path = self._local_file(s.label, lang)
                    entry["file"] = path.name
                else:
                    path = self.download_dir / name
                    url = self.url_base + name
                    entry["url"] = url
                    if path.is_file():
                        log(f"  using the earlier download {path}")
                        entry["sha256"] = download.sha256_file(path)
                    else:
                        try:
                            entry["sha256"] = download.fetch(url, path, log)
                        except PrepareError as e:
                            raise PrepareError(
                                f"{e}\nCould not download Multi30k. Fetch data/task1/raw/*.gz of "
                                "https://github.com/multi30k/dataset by hand and pass --raw DIR."
                            ) from e
                data = text.read_bytes(path)
                md5 = hashlib.md5(data).hexdigest()
                known = KNOWN_MD5.get((s.label, lang))
                entry["md5_decompressed"] = md5
                entry["matches_known_snapshot"] = None if known is None else md5 == known
                if known is not None and md5 != known:
                    mismatched.append(path.name)
                texts[s.name][lang] = text.lines_from_bytes(data, str(path))
                s.origin[lang] = [entry["file"]]
                files_info.append(entry)
        if mismatched:
            log(
                "  warning: these files differ from the known snapshot (commit a3d2e0d2): "
                + ", ".join(mismatched)
            )
        info = {
            "raw": str(self.raw) if self.raw else None,
            "url_base": None if self.raw else self.url_base,
            "files": files_info,
            "checksum_note": (
                "no checksums are published for Multi30k; md5_decompressed is compared with the "
                "snapshot of commit a3d2e0d26b56f3846f66a952536ffed4e401d05a"
            ),
        }
        return texts, info
