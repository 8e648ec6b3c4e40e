"""A JPEG's scans, counted as libjpeg will meet them, before it decodes any: a progressive JPEG may hold any number
of scans and libjpeg walks every block of the image in each, so 2.6 KB took 52 s, and the time grew by 20 ms for
every byte (review 34). A file past these bounds is undecodable, a rule of the record alone; within them, what a
record's entropy data makes libjpeg do costs time by its bytes."""
from __future__ import annotations

import os
import re

#: more scans than this: undecodable (libjpeg-turbo's own guard, TurboJPEG's scan limit, is 500; encoders write ~10)
MAX_SCANS = 1000
#: blocks decoded in all, each block counted in every scan that holds its component, whatever the scan's band:
#: libjpeg's time goes by the block, not the coefficient (with no entropy data, 41 ns a block in an arithmetic scan
#: of one coefficient, 47 in one of 63: review 35, whose 9 KB file of 895 one-coefficient scans took 88 s within a
#: bound on coefficients). 2^26 of them take 2-4 s here; a sequential JPEG of 2.8 G pixels at 4:2:0, or a
#: progressive one at libjpeg's 560 MB of coefficients (190 M pixels) in 15 scans of each component, still decodes
MAX_BLOCKS = 1 << 26
#: an arithmetic-coded block counts as this many: its decoder makes up to ~126 adaptive decisions a block, which
#: cost a fraction of a bit each once adapted (995 refinement scans of a 512 x 512 image, 142 KB, took 1.6 s: 400 ns
#: a block, where a Huffman block with no data takes 45 and one with data costs its bits)
ARITHMETIC_BLOCK = 16
#: a lossless JPEG (no blocks) counts a block for this many samples (1.5 ns a sample with no entropy data)
SAMPLES_PER_BLOCK = 16
#: markers (restarts aside) past this many: undecodable; each costs a step of this walk (and of Pillow's parse)
MAX_MARKERS = 1 << 16
#: bytes outside segments (fill, padding, restart markers) before the first scan past this many: undecodable; Pillow's
#: header parse steps through them one at a time in Python (2 MB of 0xFF took 2.6 s)
MAX_BETWEEN = 1 << 16
#: a run of more 0xFF fill bytes than this outside segments: undecodable; libjpeg passes over fill without moving its
#: read position and Pillow feeds it again from the run's start each time, so the time went as the square of the run
#: (64 MB before an EOI took 32 s: review 35); encoders write none
MAX_FILL = 1 << 16
#: markers that libjpeg refuses before the first scan (a second SOI, an EOI, hierarchical and extension codes), which
#: Pillow's header parse, meeting them first, would step through byte by byte (16 MB took 13 s: review 35)
REFUSED_BEFORE_SCAN = {0xD8, 0xD9, 0xC5, 0xC6, 0xC7, 0xC8, 0xCD, 0xCE, 0xCF, 0xDE, 0xDF, *range(0xF0, 0xFE)}
#: the file is read in windows of this many bytes
WINDOW = 1 << 20

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# 0xFF (the last of any fill bytes), then a code that libjpeg acts on. Not: 0x00 (a stuffed data byte), restarts
# (RST0-7, consumed inside a scan and ignored between segments), codes below SOF0 (TEM, ignored; reserved ones,
# skipped at a restart and an error between segments). Counting from every other marker meets each scan libjpeg
# decodes, and maybe more where libjpeg would stop with an error: never fewer. (Not "\xff+": a run of 0xFF
# without a code after it backtracks, quadratic in its length: 100 KB of them took 52 s.)
_MARKER = re.compile(rb"\xff([\xc0-\xcf\xd8-\xfe])")
_NOT_FILL = re.compile(rb"[^\xff]")
_FILL_RUN = b"\xff" * (MAX_FILL + 1)  # found by bytes.find, linear (a counted expression would backtrack)


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
        at the end; ValueError if a run of more than MAX_FILL bytes 0xFF comes first."""
        if not self.start <= pos < self.start + len(self.data):
            self.start, self.data = pos, self.read(pos, self.window)
        run = 0
        while self.data:
            m = _MARKER.search(self.data, pos - self.start)
            at_end = self.start + len(self.data) >= self.size
            if m:
                self._fill(pos - self.start, m.start() + 1, run)  # the marker's own 0xFF with the fill before it
                return m.group(1)[0], self.start + m.start(), self.start + m.end()
            if at_end:
                self._fill(pos - self.start, len(self.data), run)
                break
            stop = len(self.data) - 1 if self.data.endswith(b"\xff") else len(self.data)  # a run of 0xFF may go on:
            run = self._fill(pos - self.start, stop, run)  # its last byte is searched again with the next window
            pos = self.start + stop
            self.start, self.data = pos, self.read(pos, self.window)
        return None

    def _fill(self, a: int, b: int, run: int) -> int:
        """The run of 0xFF at the end of data[a:b], `run` (that before a) included; ValueError past MAX_FILL."""
        data = self.data
        if data.find(_FILL_RUN, a, b) >= 0:
            raise ValueError("a JPEG with more fill bytes in a row than mepf decodes")
        first = _NOT_FILL.search(data, a, b)
        if run + (first.start() if first else b) - a > MAX_FILL:
            raise ValueError("a JPEG with more fill bytes in a row than mepf decodes")
        if first is None:
            return run + b - a
        return b - a - len(data[a:b].rstrip(b"\xff"))


class _Frame:
    """An SOF segment: the blocks of each component (for lossless, its samples / SAMPLES_PER_BLOCK), padded to whole
    MCUs as libjpeg decodes an interleaved scan, and weighted for arithmetic coding. A malformed one (which libjpeg
    refuses) counts what it can."""

    def __init__(self, code: int, body: bytes):
        lossless = code in LOSSLESS
        height = int.from_bytes(body[1:3], "big")
        width = int.from_bytes(body[3:5], "big")
        comps = [body[i:i + 3] for i in range(6, len(body) - 2, 3)][:body[5] if len(body) > 5 else 0]
        h = [max(1, c[1] >> 4) for c in comps]
        v = [max(1, c[1] & 15) for c in comps]
        unit = 1 if lossless else 8
        across = -(-width // (unit * max(h, default=1)))
        down = -(-height // (unit * max(v, default=1)))
        weight = ARITHMETIC_BLOCK if code in ARITHMETIC else 1
        self.blocks: dict = {}
        for c, hc, vc in zip(comps, h, v):
            units = across * hc * down * vc
            blocks = weight * (-(-units // SAMPLES_PER_BLOCK) if lossless else units)
            self.blocks[c[0]] = max(self.blocks.get(c[0], 0), blocks)
        self.largest = max(self.blocks.values(), default=0)

    def scan_blocks(self, body: bytes) -> int:
        """The blocks an SOS segment's scan decodes: all of each of its components (an id the frame lacks, which
        libjpeg refuses, as the largest)."""
        n = body[0] if body else 0
        return sum(self.blocks.get(i, self.largest) for i in body[1:1 + 2 * n:2])


def segments(fd: int, window: int = WINDOW):
    """The markers libjpeg acts on in the JPEG open at `fd`, in order up to its first EOI: (code, body), the body
    read for SOF and SOS only (None otherwise). Each segment is skipped by its length, anything between segments
    passed over; ValueError past MAX_MARKERS, MAX_BETWEEN or MAX_FILL, or at a marker of REFUSED_BEFORE_SCAN before
    the first scan. Nothing for a file that does not start as libjpeg requires."""
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
        if not scanned and code in REFUSED_BEFORE_SCAN:
            raise ValueError("a JPEG with a marker libjpeg refuses before its first scan")
        pos, scanned = after, scanned or code == SOS
        if code in (None, EOI):
            return
        if code == SOI:  # no length (and an error to libjpeg)
            yield code, None
            continue
        length = int.from_bytes(r.read(pos, 2), "big")
        yield code, r.read(pos + 2, length - 2) if code == SOS or code in SOF else None
        pos += max(2, length)
    raise ValueError("a JPEG with more markers than mepf decodes")


def scans(fd: int, window: int = WINDOW) -> tuple:
    """(scans, blocks) of the JPEG open at `fd`, as libjpeg would decode them; ValueError as soon as a bound is
    past. (0, 0) for a file that does not start as libjpeg requires."""
    frame, count, blocks = None, 0, 0
    for code, body in segments(fd, window):
        if code in SOF and frame is None:  # libjpeg refuses a second frame
            frame = _Frame(code, body)
        elif code == SOS:
            count += 1
            blocks += frame.scan_blocks(body) if frame is not None else 0  # libjpeg refuses a scan before the frame
            if count > MAX_SCANS:
                raise ValueError("a JPEG with more scans than mepf decodes")
            if blocks > MAX_BLOCKS:
                raise ValueError("a JPEG whose scans hold more blocks than mepf decodes")
    return count, blocks
