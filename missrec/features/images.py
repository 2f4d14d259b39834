"""Open an item image from a local file (relative to the domain folder) or an ``http(s)`` URL.

Never raises for a bad image: the result says whether the image is missing (no reference, file not
found, HTTP 404/410) or unreadable (corrupt bytes, a fetch that kept failing), with the reason, so the
caller can write a zero row and list the item.
"""

from __future__ import annotations

import io
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 64 << 20
_PERMANENT_HTTP = {400, 401, 403, 404, 410}
_USER_AGENT = "missrec-feature-extraction/1"


@dataclass(frozen=True)
class FetchConfig:
    """How URLs are fetched: per-try timeout (seconds), retries after the first try, backoff base (s)."""

    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5


@dataclass(frozen=True)
class ImageResult:
    """``image`` (RGB, decoded) or ``None`` with ``status`` ``"missing"`` / ``"unreadable"`` and a reason."""

    image: Image.Image | None
    status: str  # "ok" | "missing" | "unreadable"
    reason: str = ""


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def open_image(ref: str, root: str | Path, fetch: FetchConfig = FetchConfig()) -> ImageResult:
    """Open image ``ref`` (empty = no image; a URL; or a path relative to ``root``) as RGB."""
    if not ref:
        return ImageResult(None, "missing", "no image given")
    if is_url(ref):
        data, err, status = _fetch(ref, fetch)
        if data is None:
            return ImageResult(None, status, err)
        return _decode(io.BytesIO(data), ref)
    path = Path(ref) if Path(ref).is_absolute() else Path(root) / ref
    if not path.is_file():
        return ImageResult(None, "missing", f"file not found: {path}")
    return _decode(path, str(path))


def _decode(src: io.BytesIO | Path, name: str) -> ImageResult:
    try:
        with Image.open(src) as im:
            im.load()
            return ImageResult(im.convert("RGB"), "ok")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return ImageResult(None, "unreadable", f"cannot decode {name}: {type(err).__name__}: {err}")


def _fetch(url: str, cfg: FetchConfig) -> tuple[bytes | None, str, str]:
    """(bytes, "", "ok") or (None, reason, "missing" | "unreadable") after ``cfg.retries`` retries."""
    last = ""
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff * 2 ** (attempt - 1))
        try:
            req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                data = resp.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                return None, f"larger than {MAX_IMAGE_BYTES} bytes: {url}", "unreadable"
            return data, "", "ok"
        except urllib.error.HTTPError as err:
            if err.code in _PERMANENT_HTTP:
                return None, f"HTTP {err.code} for {url}", "missing"
            last = f"HTTP {err.code} for {url}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            last = f"{type(err).__name__}: {err} for {url}"
        log.debug("fetch %s failed (try %d of %d): %s", url, attempt + 1, cfg.retries + 1, last)
    return None, f"failed after {cfg.retries + 1} tries: {last}", "unreadable"


__all__ = ["FetchConfig", "ImageResult", "is_url", "open_image"]
