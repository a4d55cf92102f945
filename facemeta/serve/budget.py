"""A memory bound for the service: at most so many decoded pixels in flight across all requests.

Each upload is capped on its own (facemeta.images: 40 million pixels by default), but a small compressed
file can claim a large image (a 105 KB PNG of 36 megapixels), and decoding and detecting it costs about
45 bytes per pixel (RGB copies, the detector's image pyramid): eight such uploads at once took 13 GB.
The service therefore reads the size each upload's header claims (nothing is decoded) and holds that many
pixels of a shared budget while the request decodes and runs the model; a request that does not fit
waits for room, and one image larger than the whole budget runs alone. A request that waits longer than
``wait`` seconds is refused with 503 (the server is busy), never left hanging.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

DEFAULT_MEGAPIXELS = 80  # two images at the per-image cap: about 3.6 GB of decoding at ~45 bytes per pixel
BYTES_PER_PIXEL = 45  # measured: a 36-megapixel PNG took about 1.6 GB while it was decoded and detected
DEFAULT_WAIT = 120.0


class Busy(Exception):
    """No room in the pixel budget within the wait: the caller answers 503."""


def claimed_pixels(paths: Sequence[Path]) -> int:
    """Pixels the images' headers claim, summed (read from headers only; a file that is not an image counts
    0: the image gate refuses it later without decoding it)."""
    from PIL import Image

    total = 0
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - any unreadable header: the image gate says why later
            continue
        total += max(0, int(w)) * max(0, int(h))
    return total


class PixelBudget:
    """At most ``limit`` pixels held at once by all requests together (see the module docstring)."""

    def __init__(self, limit: int, wait: float = DEFAULT_WAIT) -> None:
        if limit < 1:
            raise ValueError(f"the pixel budget must be >= 1, got {limit}")
        self.limit = int(limit)
        self.wait = wait
        self.used = 0
        self.peak = 0  # the most pixels ever held at once (for tests and /api/info)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget (at most all of it) while the block runs; waits for room, Busy after
        ``wait`` seconds."""
        want = max(0, min(int(pixels), self.limit))
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + want <= self.limit, timeout=self.wait):
                raise Busy(f"the server is busy decoding other images ({self.used:,} of {self.limit:,} pixels "
                           "in flight); try again shortly")
            self.used += want
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= want
                self._cond.notify_all()
