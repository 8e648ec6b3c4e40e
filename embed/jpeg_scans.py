"""A JPEG's scans, counted as libjpeg will meet them, before it decodes any: a progressive JPEG may hold any number
of scans and libjpeg walks every block of the image in each, so 2.6 KB took 52 s, and the time grew by 20 ms for
every byte (review 34). A file past these bounds is undecodable, a rule of the record alone; within them, what a
record's entropy data makes libjpeg do costs time by its bytes."""
from __future__ import annotations

import os
import re

import numpy as np

#: more scans than this: undecodable (libjpeg-turbo's own guard, TurboJPEG's scan limit, is 500; encoders write ~10)
MAX_SCANS = 1000
#: blocks decoded in all, each block counted in every scan that holds its component, whatever the scan's band:
#: libjpeg's time goes by the block, not the coefficient (with no entropy data, 41 ns a block in an arithmetic scan
#: of one coefficient, 47 in one of 63: review 35, whose 9 KB file of 895 one-coefficient scans took 88 s within a
#: bound on coefficients). 2^25 of them took 1.6 s here (2.6 s with the colour conversion of an image at the cap);
#: a sequential JPEG of 1.4 G pixels at 4:2:0, or a progressive one at libjpeg's 560 MB of coefficients (190 M
#: pixels) in 7 scans of each component, still decodes
MAX_BLOCKS = 1 << 25
#: an arithmetic-coded block counts as this many: its decoder makes ~126 adaptive decisions a block at most that are
#: paid for by no bit (once adapted they cost a fraction of one: 995 refinement scans of a 512 x 512 image, 142 KB,
#: took 1.6 s, 400 ns a block, where a Huffman block with no data takes 45 and one with data costs its bits)
ARITHMETIC_BLOCK = 16
#: bytes of arithmetic-coded data in all: each bit may buy ~30 adapted decisions (a coefficient's magnitude), so 33 MB
#: took 20 s (610 ns a byte: review 36); plain Pillow decodes no arithmetic scan of more than its 64 KB reads anyway
MAX_ARITHMETIC_DATA = 1 << 20
#: a lossless JPEG (no blocks) counts a block for this many samples (1.5 ns a sample with no entropy data)
SAMPLES_PER_BLOCK = 16
#: markers (restarts aside; the first SOI and a final EOI included) past this many: undecodable; each costs a step
#: of this walk (and of Pillow's parse)
MAX_MARKERS = 1 << 16
#: bytes outside segments (fill, padding, restart markers) before the first scan past this many: undecodable; Pillow's
#: header parse steps through them one at a time in Python (2 MB of 0xFF took 2.6 s)
MAX_BETWEEN = 1 << 16
#: 0xFF fill bytes (each 0xFF after another) outside segments, all told: libjpeg passes over fill without moving its
#: read position (in a Huffman MCU it starts the MCU again) and Pillow feeds it all again, so the time went as the
#: square of a run (64 MB before an EOI took 32 s: review 35) or of an MCU padded with fill (42 MB, 15 s: review 36);
#: encoders write none
MAX_FILL = 1 << 16
#: markers that libjpeg (as Pillow drives it) refuses before the first scan: an SOI but right after a stream of
#: tables alone (SOI tables EOI), an EOI but one ending such a stream, hierarchical and extension codes; Pillow's
#: header parse, meeting them first, would step through what follows byte by byte (16 MB took 13 s: review 35). So
#: is a second frame (SOF), which Pillow would parse in Python (51 MB of them took 5 s and 1.4 GB: review 36)
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


class _Reader:
    """A file read by position (never moving the file's own), a window at a time."""

    def __init__(self, fd: int, window: int):
        self.fd, self.size, self.window = fd, os.fstat(fd).st_size, max(2, window)
        self.start, self.data, self.fill = 0, b"", 0

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
        at the end; the fill bytes passed over are added to self.fill (ValueError past MAX_FILL)."""
        if not self.start <= pos < self.start + len(self.data):
            self.start, self.data = pos, self.read(pos, self.window)
        after_ff = False
        while self.data:
            m = _MARKER.search(self.data, pos - self.start)
            if m:
                self._fill(pos - self.start, m.start() + 1, after_ff)  # the marker's own 0xFF with the fill before
                return m.group(1)[0], self.start + m.start(), self.start + m.end()
            if self.start + len(self.data) >= self.size:
                self._fill(pos - self.start, len(self.data), after_ff)
                break
            stop = len(self.data) - 1 if self.data.endswith(b"\xff") else len(self.data)  # a run of 0xFF may go on:
            after_ff = self._fill(pos - self.start, stop, after_ff)  # its last byte is searched with the next window
            pos = self.start + stop
            self.start, self.data = pos, self.read(pos, self.window)
        return None

    def _fill(self, a: int, b: int, after_ff: bool) -> bool:
        """Counts the fill in data[a:b] (after_ff: the byte before a was 0xFF); whether its last byte is 0xFF."""
        if b <= a:
            return after_ff
        ff = np.frombuffer(self.data, np.uint8, b - a, a) == 0xFF
        self.fill += int(np.count_nonzero(ff[1:] & ff[:-1])) + int(after_ff and ff[0])
        if self.fill > MAX_FILL:
            raise ValueError("a JPEG with more fill bytes than mepf decodes")
        return bool(ff[-1])


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
        self.arithmetic = code in ARITHMETIC
        weight = ARITHMETIC_BLOCK if self.arithmetic else 1
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
    """The markers libjpeg acts on in the JPEG open at `fd`, in order up to its image's EOI (or the file's end, given
    as an EOI): (code, body, the bytes passed over before it), the body read for SOF and SOS only (None otherwise).
    Each segment is skipped by its length, anything between segments passed over; ValueError past MAX_MARKERS,
    MAX_BETWEEN or MAX_FILL, or before the first scan at a marker of REFUSED_BEFORE_SCAN or a second frame. Nothing
    for a file that does not start as libjpeg requires."""
    r = _Reader(fd, window)
    if r.read(0, 2) != b"\xff\xd8":
        return
    pos, between, scanned, framed, markers = 2, 0, False, False, 1
    while True:
        found = r.marker(pos)
        code, at, after = found if found is not None else (None, r.size, r.size)
        markers += found is not None
        if markers > MAX_MARKERS:
            raise ValueError("a JPEG with more markers than mepf decodes")
        if not scanned:
            between += at - pos
            if between > MAX_BETWEEN:
                raise ValueError("a JPEG with more bytes between its segments than mepf decodes")
            if code == EOI and not framed and r.read(after, 2) == b"\xff\xd8":
                # a stream of tables alone (SOI tables EOI): Pillow asks libjpeg for a header again while it returns
                # JPEG_HEADER_TABLES_ONLY, and libjpeg then takes exactly FF D8 and reads the image's stream
                pos, markers = after + 2, markers + 1
                continue
            if code in REFUSED_BEFORE_SCAN or (framed and code in SOF):
                raise ValueError("a JPEG with a marker libjpeg refuses before its first scan")
        gap, pos, scanned, framed = at - pos, after, scanned or code == SOS, framed or code in SOF
        if code in (None, EOI):
            yield EOI, None, gap
            return
        if code == SOI:  # no length (and an error to libjpeg)
            yield code, None, gap
            continue
        length = int.from_bytes(r.read(pos, 2), "big")
        yield code, r.read(pos + 2, length - 2) if code == SOS or code in SOF else None, gap
        pos += max(2, length)


def scans(fd: int, window: int = WINDOW) -> tuple:
    """(scans, blocks) of the JPEG open at `fd`, as libjpeg would decode them; ValueError as soon as a bound is
    past. (0, 0) for a file that does not start as libjpeg requires."""
    frame, count, blocks, coded, in_scan = None, 0, 0, 0, False
    for code, body, gap in segments(fd, window):
        if in_scan and frame.arithmetic:
            coded += gap
            if coded > MAX_ARITHMETIC_DATA:
                raise ValueError("a JPEG with more arithmetic-coded data than mepf decodes")
        in_scan = code == SOS and frame is not None
        if code in SOF and frame is None:
            frame = _Frame(code, body)
        elif code == SOS:
            count += 1
            blocks += frame.scan_blocks(body) if frame is not None else 0  # libjpeg refuses a scan before the frame
            if count > MAX_SCANS:
                raise ValueError("a JPEG with more scans than mepf decodes")
            if blocks > MAX_BLOCKS:
                raise ValueError("a JPEG whose scans hold more blocks than mepf decodes")
    return count, blocks
