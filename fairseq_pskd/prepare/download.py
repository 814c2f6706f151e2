"""Downloading with progress, and checksums."""
from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import PrepareError

USER_AGENT = "fairseq-pskd-prepare/1.0 (+python urllib)"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, log, expect_gzip: bool = True, timeout: float = 60.0) -> str:
    """Download url to dest (via dest.part, renamed only when complete); returns its sha256.

    With expect_gzip the first bytes must be the gzip magic: file hosts answer a dead link or a
    confirmation page with HTML and status 200, which must not be taken for the archive.
    Raises PrepareError on any failure (the caller may try the next URL).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    t0 = last = time.time()
    got = 0
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            first = True
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                if first and expect_gzip and not block.startswith(b"\x1f\x8b"):
                    raise PrepareError(
                        f"{url} did not return a gzip file (got {block[:60]!r}...); "
                        "the link is probably dead or needs a browser"
                    )
                first = False
                h.update(block)
                out.write(block)
                got += len(block)
                if time.time() - last > 5:
                    last = time.time()
                    size = f"/{total / 1e6:.1f}" if total else ""
                    log(f"  download {dest.name}: {got / 1e6:.1f}{size} MB, {last - t0:.0f}s")
            if total and got != total:
                raise PrepareError(f"{url}: got {got} of {total} bytes (connection dropped?)")
    except PrepareError:
        part.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        raise PrepareError(f"download of {url} failed: {e}") from e
    if got == 0:
        part.unlink(missing_ok=True)
        raise PrepareError(f"{url} returned no data")
    part.replace(dest)
    log(f"  downloaded {url} -> {dest} ({got / 1e6:.1f} MB, {time.time() - t0:.0f}s)")
    return h.hexdigest()


def check_sha256(path: Path, actual: str, expected: str | None, log, what: str) -> bool:
    """Compare with a user-given checksum; without one, say that nothing was verified.

    No checksum is published for these releases (as far as we can see), so none is built in.
    Returns whether the file was verified.
    """
    if expected:
        if actual.lower() != expected.lower():
            raise PrepareError(
                f"sha256 of {path} is {actual}, but --sha256 asks for {expected.lower()}; "
                "the file is damaged or a different release: delete it and fetch it again"
            )
        log(f"  sha256 of {path.name} verified ({actual})")
        return True
    log(
        f"  note: no published checksum exists for {what}, so {path.name} could not be "
        f"verified; its sha256 is {actual} (recorded in prepare.json; pass --sha256 HEX "
        "to enforce one)"
    )
    return False
