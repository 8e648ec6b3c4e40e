"""A JPEG's scans, counted as libjpeg will meet them, before it decodes any: a progressive JPEG may hold any number
of scans and libjpeg walks every block of the image in each, so 2.6 KB took 52 s, and the time grew by 20 ms for
every byte (review 34). A file past these bounds is undecodable, a rule of the record alone."""
from __future__ import annotations

import os
import re

#: more scans than this: undecodable (libjpeg-turbo's own guard, TurboJPEG's scan limit, is 500; encoders write ~10)
MAX_SCANS = 1000
#: a conforming progression codes each coefficient in one first scan and at most 13 refinements (Al <= 13)
MAX_PASSES = 14
#: coefficient visits in all, whatever the image's size: 14 passes over 2^31 / 14 coefficients, an 8-bit colour
#: image of 700 M pixels at full chroma (a sequential JPEG of 65,500 x 65,500 in 111 bytes took 13 s)
MAX_VISITS = 1 << 31
#: markers (restarts aside) past this many: undecodable; each costs a step of this walk (and of Pillow's parse)
MAX_MARKERS = 1 << 16
#: bytes outside segments (fill, padding, restart markers) before the first scan past this many: undecodable; Pillow's
#: header parse steps through them one at a time in Python (2 MB of 0xFF took 2.6 s)
MAX_BETWEEN = 1 << 16
#: the file is read in windows of this many bytes
WINDOW = 1 << 20

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
# 0xFF (the last of any fill bytes), then a code that libjpeg acts on. Not: 0x00 (a stuffed data byte), restarts
# (RST0-7, consumed inside a scan and ignored between segments), codes below SOF0 (TEM, ignored; reserved ones,
# skipped at a restart and an error between segments). Counting from every other marker meets each scan libjpeg
# decodes, and maybe more where libjpeg would stop with an error: never fewer. (Not "\xff+": a run of 0xFF
# without a code after it backtracks, quadratic in its length: 100 KB of them took 52 s.)
_MARKER = re.compile(rb"\xff([\xc0-\xcf\xd8-\xfe])")


class _Reader:
    """A file read by position (never moving the file's own), a window at a time."""

    def __init__(self, fd: int, window: int):
        self.fd, self.size, self.window = fd, os.fstat(fd).st_size, max(2, window)
        self.start, self.data = 0, b""

    def read(self, pos: int, n: int) -> bytes:
        parts = []
        while n > 0 and pos < self.size:
            part = os.pread(self.fd, min(n, self.window), pos)
            if not part:
                break
            parts.append(part)
            pos, n = pos + len(part), n - len(part)
        return b"".join(parts)

    def marker(self, pos: int):
        """The next marker libjpeg acts on at or after `pos`: (code, its position, the position after it), or None
        at the end."""
        if not self.start <= pos < self.start + len(self.data):
            self.start, self.data = pos, self.read(pos, self.window)
        while self.data:
            m = _MARKER.search(self.data, pos - self.start)
            if m:
                return m.group(1)[0], self.start + m.start(), self.start + m.end()
            end = self.start + len(self.data)
            if end >= self.size:
                break
            pos = end - 1 if self.data.endswith(b"\xff") else end  # a run of 0xFF may go on into the next window
            self.start, self.data = pos, self.read(pos, self.window)
        return None


class _Frame:
    """An SOF segment: the blocks (samples, for lossless) of each component, padded to whole MCUs as libjpeg
    decodes them, and the coefficients of the whole image. A malformed one (which libjpeg refuses) counts what
    it can."""

    def __init__(self, code: int, body: bytes):
        self.progressive, self.lossless = code in PROGRESSIVE, code in LOSSLESS
        height = int.from_bytes(body[1:3], "big")
        width = int.from_bytes(body[3:5], "big")
        comps = [body[i:i + 3] for i in range(6, len(body) - 2, 3)][:body[5] if len(body) > 5 else 0]
        h = [max(1, c[1] >> 4) for c in comps]
        v = [max(1, c[1] & 15) for c in comps]
        unit = 1 if self.lossless else 8
        across = -(-width // (unit * max(h, default=1)))
        down = -(-height // (unit * max(v, default=1)))
        self.units: dict = {}
        for c, hc, vc in zip(comps, h, v):
            self.units[c[0]] = max(self.units.get(c[0], 0), across * hc * down * vc)
        self.largest = max(self.units.values(), default=0)
        self.coefficients = sum(across * hc * down * vc for hc, vc in zip(h, v)) * (1 if self.lossless else 64)

    def visits(self, body: bytes) -> int:
        """The coefficients (samples) an SOS segment's scan visits: each block of each of its components, times the
        band's width in a progressive scan; a sequential scan decodes all 64 whatever its band."""
        n = body[0] if body else 0
        ids = body[1:1 + 2 * n:2]
        band = body[1 + 2 * n:3 + 2 * n]
        if self.lossless:
            width = 1
        elif self.progressive and len(band) == 2:
            width = min(64, max(1, band[1] - band[0] + 1))
        else:
            width = 64
        return width * sum(self.units.get(i, self.largest) for i in ids)


def segments(fd: int, window: int = WINDOW):
    """The markers libjpeg acts on in the JPEG open at `fd`, in order up to its first EOI: (code, body), the body
    read for SOF and SOS only (None otherwise). Each segment is skipped by its length, anything between segments
    passed over; ValueError past MAX_MARKERS or MAX_BETWEEN. Nothing for a file that does not start as libjpeg
    requires."""
    r = _Reader(fd, window)
    if r.read(0, 2) != b"\xff\xd8":
        return
    pos, between, scanned = 2, 0, False
    for _ in range(MAX_MARKERS):
        found = r.marker(pos)
        code, at, after = found if found is not None else (None, r.size, r.size)
        between += 0 if scanned else at - pos
        if between > MAX_BETWEEN:
            raise ValueError("a JPEG with more bytes between its segments than mepf decodes")
        pos, scanned = after, scanned or code == SOS
        if code in (None, EOI):
            return
        if code == SOI:  # no length (a second one is an error to libjpeg)
            yield code, None
            continue
        length = int.from_bytes(r.read(pos, 2), "big")
        yield code, r.read(pos + 2, length - 2) if code == SOS or code in SOF else None
        pos += max(2, length)
    raise ValueError("a JPEG with more markers than mepf decodes")


def scans(fd: int, window: int = WINDOW) -> tuple:
    """(scans, coefficient visits, the visits allowed) of the JPEG open at `fd`; ValueError as soon as a bound is
    past. (0, 0, 0) for a file that does not start as libjpeg requires."""
    frame, count, visits, allowed = None, 0, 0, 0
    for code, body in segments(fd, window):
        if code in SOF and frame is None:  # libjpeg refuses a second frame
            frame = _Frame(code, body)
            allowed = min(MAX_PASSES * frame.coefficients, MAX_VISITS)
        elif code == SOS:
            count += 1
            visits += frame.visits(body) if frame is not None else 0  # libjpeg refuses a scan before the frame
            if count > MAX_SCANS:
                raise ValueError("a JPEG with more scans than mepf decodes")
            if visits > allowed:
                raise ValueError("a JPEG whose scans pass over its image more often than mepf decodes")
    return count, visits, allowed
