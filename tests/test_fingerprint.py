"""The dataset fingerprint behind the repeat-release refusal: a multiset of canonical records, blind to
order, batching, container, file names and transform options, and a sketch that finds overlaps."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from mepf.embed.files import ArraySource, FolderSource
from mepf.embed.fingerprint import SKETCH_CAP, Fingerprint, Sketch, canonical
from tests.conftest import make_images


def fingerprint_of(src, batch_size=1000) -> Fingerprint:
    fp = Fingerprint()
    for records, labels in src.batches(batch_size):
        fp.update(records, labels)
    return fp


def write_folder(root, x, y, names=None, rgb=False):
    for i in range(len(x)):
        d = root / f"class{y[i]}"
        d.mkdir(parents=True, exist_ok=True)
        img = x[i, :, :, 0]
        im = Image.fromarray(np.stack([img] * 3, -1) if rgb else img)
        im.save(d / (names[i] if names else f"{i:04d}.png"))
    return root


@pytest.fixture
def data(tmp_path):
    x = make_images(30, seed=5)
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    return tmp_path, x, y


def test_blind_to_order_batching_container_names_and_stored_form(data):
    tmp, x, y = data
    ref = fingerprint_of(ArraySource(tmp / "d.npz", ["0", "1", "2"])).hexdigest()
    assert fingerprint_of(ArraySource(tmp / "d.npz", ["0", "1", "2"]), 7).hexdigest() == ref
    perm = np.random.default_rng(0).permutation(30)
    np.savez(tmp / "shuffled.npz", images=x[perm, :, :, 0], labels=y[perm])  # (N, H, W), another order
    assert fingerprint_of(ArraySource(tmp / "shuffled.npz", ["a", "b", "c"])).hexdigest() == ref
    with h5py.File(tmp / "d.h5", "w") as f:
        f["x"], f["y"] = x.astype(np.float32) / 255, y  # float in [0, 1], other keys, other container
    assert fingerprint_of(ArraySource(tmp / "d.h5", ["0", "1", "2"])).hexdigest() == ref
    np.savez(tmp / "half.npz", images=(x / 255).astype(np.float16), labels=y)  # a float16 copy (off the grid by
    assert fingerprint_of(ArraySource(tmp / "half.npz", ["0", "1", "2"])).hexdigest() == ref  # up to 0.06 of a step)
    np.savez(tmp / "rgb.npz", images=np.repeat(x, 3, axis=3), labels=y)  # grey stored as three equal channels
    assert fingerprint_of(ArraySource(tmp / "rgb.npz", ["0", "1", "2"])).hexdigest() == ref
    names = [f"renamed_{np.random.default_rng(i).integers(1e9)}.png" for i in range(30)]
    assert fingerprint_of(FolderSource(write_folder(tmp / "f1", x, y, names))).hexdigest() == ref
    assert fingerprint_of(FolderSource(write_folder(tmp / "f2", x, y, rgb=True))).hexdigest() == ref


def test_sees_one_pixel_one_label_and_one_duplicate(data):
    tmp, x, y = data
    ref = fingerprint_of(ArraySource(tmp / "d.npz", ["0", "1", "2"])).hexdigest()
    x2 = x.copy()
    x2[17, 3, 4, 0] ^= 1
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 3
    dup_x, dup_y = np.concatenate([x, x[:1]]), np.append(y, y[0])
    for name, (a, b) in {"pixel": (x2, y), "label": (x, y2), "duplicate": (dup_x, dup_y)}.items():
        np.savez(tmp / f"{name}.npz", images=a, labels=b)
        assert fingerprint_of(ArraySource(tmp / f"{name}.npz", ["0", "1", "2"])).hexdigest() != ref, name


def test_canonical_form():
    grey = make_images(1)[0]
    assert canonical(grey).shape == (28, 28, 1) and canonical(grey[:, :, 0]).shape == (28, 28, 1)
    np.testing.assert_array_equal(canonical(np.repeat(grey, 3, 2)), canonical(grey))
    np.testing.assert_array_equal(canonical(grey.astype(np.float32) / 255), grey)
    off_grid = grey.astype(np.float32) / 255 + 0.3 / 255
    assert canonical(off_grid).dtype == np.float32  # not an 8-bit image: hashed as the floats it stores
    colour = make_images(1, channels=3)[0]
    assert canonical(colour).shape == (28, 28, 3)


def test_sketch_finds_subsets_and_supersets_beyond_its_cap():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (3 * SKETCH_CAP, 4, 4, 1), dtype=np.uint8)
    other = rng.integers(0, 256, (2000, 4, 4, 1), dtype=np.uint8)

    def fp(records):
        f = Fingerprint()
        f.update(records, None)
        return f

    whole, half, unrelated = fp(big), fp(big[: len(big) // 2]), fp(other)
    assert len(whole.sketch.hashes) <= SKETCH_CAP and whole.sketch.level >= 1
    shared, share_half, share_whole = half.sketch.overlap(whole.sketch)
    # a subset: all of its records are in the other, and about half of the other's are in it
    assert shared > 0 and share_half == 1.0 and 0.35 < share_whole < 0.65
    assert unrelated.sketch.overlap(whole.sketch)[0] == 0
    assert Sketch.from_json(whole.sketch.to_json()).hashes == whole.sketch.hashes


def test_shards_merge_to_the_single_pass_fingerprint():
    rng = np.random.default_rng(1)
    records = rng.integers(0, 256, (2 * SKETCH_CAP + 100, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, len(records))
    single = Fingerprint()
    single.update(records, labels)
    parts = [Fingerprint() for _ in range(3)]
    for i, p in enumerate(parts):
        p.update(records[i::3], labels[i::3])
    merged = parts[0]
    merged.merge(parts[1])
    merged.merge(parts[2])
    assert merged.hexdigest() == single.hexdigest()
    assert merged.sketch.level == single.sketch.level and merged.sketch.hashes == single.sketch.hashes


def test_log_entries_without_or_with_a_damaged_sketch_compare_by_fingerprint():
    from mepf.embed.release_log import composable, related

    fp = Fingerprint()
    fp.update(make_images(5), None)
    old = {"fingerprint": fp.hexdigest(), "mu": 1.0}  # written before sketches existed
    damaged = {"fingerprint": "x", "sketch": {"level": "?", "hashes": "not base64!"}, "mu": 1.0}
    found = related([old, damaged], fp)
    assert found["same"] == [old] and not found["most"] and not found["some"]
    assert composable([old, damaged], damaged) == [damaged]


def test_a_log_line_that_is_not_an_entry_is_one_clear_error(tmp_path):
    from mepf.artifacts.errors import MepfError
    from mepf.embed.release_log import read_log

    for bad in ("[1, 2]", "7", "not json"):
        (tmp_path / "log.jsonl").write_text('{"fingerprint": "x"}\n' + bad + "\n")
        with pytest.raises(MepfError, match="line 2 is corrupt"):
            read_log(tmp_path / "log.jsonl")


def test_keyed_fingerprints_find_overlaps_only_under_their_key_and_show_nothing_without_it():
    import base64
    import json

    from mepf.embed.fingerprint import SEALED_BYTES, open_sketch, record_hash, tag, tag_key
    from mepf.embed.release_log import composable, mixed_note, new_entry, related

    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (3 * SKETCH_CAP, 4, 4, 1), dtype=np.uint8)
    key, other_key = bytes(range(32)), bytes(range(1, 33))

    def fp(records, k=key, **kw):
        f = Fingerprint(tag_key(k) if k else None, **kw)
        f.update(records, None)
        return f

    whole, half = fp(big), fp(big[: len(big) // 2])
    shared, share_half, share_whole = half.tag_sketch.overlap(whole.tag_sketch)
    assert shared > 0 and share_half == 1.0 and 0.35 < share_whole < 0.65  # the same estimate as plain sketches
    assert fp(big[: len(big) // 2], other_key).tag_sketch.overlap(whole.tag_sketch)[0] == 0
    assert half.sketch.overlap(whole.tag_sketch)[0] == 0  # plain and keyed samples never compare
    # which records are sampled depends on the key, not on the plain hashes anyone can compute
    hashes = [record_hash(r) for r in big]
    sampled = {k: {i for i, h in enumerate(hashes)
                   if int.from_bytes(tag(tag_key(k), h)[:16], "big") in f.tag_sketch.hashes}
               for k, f in ((key, whole), (other_key, fp(big, other_key)))}
    assert len(sampled[key]) == len(whole.tag_sketch.hashes) and sampled[key] != sampled[other_key]
    # what the log stores: a sealed sketch of one size whatever the data's, no plain record hash or fingerprint
    small = fp(big[:50])
    entry, big_entry = new_entry(small, key, output="x"), new_entry(whole, key, output="y")
    boxes = [base64.b64decode(e["sketch"]["box"]) for e in (entry, big_entry)]
    assert len(boxes[0]) == len(boxes[1]) == SEALED_BYTES and set(entry["sketch"]) == {"sealed", "nonce", "box", "mac"}
    for h in hashes[:50]:
        assert h[:16] not in boxes[0] and tag(tag_key(key), h)[:16] not in boxes[0]
    assert small.hexdigest() not in json.dumps(entry) and entry["fingerprint"].startswith("k1:")
    assert open_sketch(key, entry["sketch"]).hashes == small.tag_sketch.hashes  # the owner's key opens it
    assert open_sketch(other_key, entry["sketch"]) is None and open_sketch(None, entry["sketch"]) is None
    tampered = {**entry["sketch"], "box": base64.b64encode(bytes([boxes[0][0] ^ 1]) + boxes[0][1:]).decode()}
    assert open_sketch(key, tampered) is None
    assert related([entry], fp(big[:50]), key)["same"] == [entry] and related([entry], fp(big[:50], None))["same"] == []
    assert related([big_entry], fp(big[:2000]), key)["most"] == [big_entry]  # a subset, found inside the seal
    assert related([big_entry], fp(big[:2000]))["most"] == []  # without the key the seal hides it
    # an in-memory set fingerprinted without the key gets the same keyed result once the key is known
    late = fp(big[:50], None, keep_hashes=True).with_key(key)
    assert late.tag_sketch.hashes == small.tag_sketch.hashes
    assert related([entry], late, key)["same"] == [entry]
    # an entry written before keys (plain sketch) is still matched, record by record, through the plain sketch
    old = {"fingerprint": "earlier", "sketch": fp(big[: len(big) // 2], None).sketch.to_json()}
    assert related([old], whole, key)["most"] == [old]
    # an entry of a log from before sealing (open tags under the log's own key) is matched through legacy tags
    legacy = Fingerprint(legacy_key=key)
    legacy.update(big[: len(big) // 2], None)
    v2 = {"fingerprint": "v2", "key_id": "x", "sketch": legacy.legacy_sketch.to_json()}
    assert v2["sketch"]["keyed"] is True
    assert related([v2], fp(big, key, legacy_key=key), key)["most"] == [v2] and related([v2], whole, key)["most"] == []
    # between stored entries, a plain one meets keyed ones through its fingerprint only, and the audit says so
    same_old = {"fingerprint": small.hexdigest(), "sketch": fp(big[:50], None).sketch.to_json()}
    assert composable([same_old, entry], same_old, key) == [same_old, entry]
    assert composable([same_old, entry], same_old) == [same_old]
    assert mixed_note([same_old, entry]) and mixed_note([entry], key) is None and mixed_note([entry]) is not None
    # a release's own record of what it composes with is read without the key
    big_entry["output_sha256"] = "sha-of-y"
    linked = new_entry(fp(big[:2000]), key, composes_with=["sha-of-y"], output="z")
    assert composable([big_entry, linked], big_entry) == [big_entry, linked]
    assert composable([big_entry, linked], linked) == [linked, big_entry]


def test_a_superset_of_a_small_earlier_release_is_found_though_its_sketch_skips_it():
    """A pilot of a few records, then the whole dataset: the whole's sketch samples 1 in 2^L records, so a
    pilot whose records it skips shared nothing in the sketch comparison (missed 19 times in 30 for 20 records
    of 70k, review 8). This run sees every record: its tag filter finds the pilot's tags."""
    import secrets

    from mepf.embed.fingerprint import tag, tag_key
    from mepf.embed.release_log import new_entry, related

    key = secrets.token_bytes(32)
    rng = np.random.default_rng(8)
    whole = rng.integers(0, 256, (3 * SKETCH_CAP, 4, 4, 1), dtype=np.uint8)
    big = Fingerprint(tag_key(key), expected=len(whole))
    big.update(whole, None)
    assert big.tag_sketch.level >= 1
    level = Sketch._level_of  # the pilot: records the whole's sketch does not sample (the adversarial case)
    skipped = [r for r in whole if level(int.from_bytes(tag(tag_key(key), record_digest(r))[:16], "big"))
               < big.tag_sketch.level][:3]
    pilot = Fingerprint(tag_key(key), expected=3)
    pilot.update(np.array(skipped), None)
    entry = new_entry(pilot, key)
    assert related([entry], big, key)["most"] == [entry]
    without = Fingerprint(tag_key(key))  # the same run without its filter: what the sketches alone see
    without.update(whole, None)
    assert related([entry], without, key) == {"same": [], "most": [], "some": []}
    other = Fingerprint(tag_key(key), expected=len(whole))  # unrelated data: no chance hit
    other.update(rng.integers(0, 256, (3 * SKETCH_CAP, 4, 4, 1), dtype=np.uint8), None)
    assert related([entry, new_entry(big, key)], other, key) == {"same": [], "most": [], "some": []}
    part = Fingerprint(tag_key(key), expected=8)  # a pilot 3 of whose 8 records are in the whole: some
    part.update(np.concatenate([np.array(skipped), rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)]), None)
    assert len(related([new_entry(part, key)], big, key)["some"]) == 1


def record_digest(r):
    from mepf.embed.fingerprint import record_hash

    return record_hash(r)


def test_shard_tag_filters_merge_to_the_single_pass_filter_and_travel_as_bytes():
    import secrets

    from mepf.embed.fingerprint import tag_key

    k = tag_key(secrets.token_bytes(32))
    records = np.random.default_rng(2).integers(0, 256, (900, 4, 4, 3), dtype=np.uint8)
    single = Fingerprint(k, expected=len(records))
    single.update(records, None)
    parts = [Fingerprint(k, expected=len(records)) for _ in range(3)]
    for i, p in enumerate(parts):
        p.update(records[i::3], None)
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(Fingerprint.from_bytes(p.to_bytes()))
    assert np.array_equal(merged.tag_filter.bits, single.tag_filter.bits)
    assert len(single.to_bytes()) <= single.max_bytes()
    raw = single.to_bytes()
    for bad in (raw[:-1], raw + b"\0" * 8):  # a filter of no power-of-two size
        with pytest.raises(ValueError):
            Fingerprint.from_bytes(bad)


def test_a_full_tag_filter_corrects_for_chance_hits_and_stops_when_it_cannot_tell():
    """Near its size cap the filter finds tags by chance: 40% truly shared read as 52-75% ("most", refused) on
    simulated 2-3e8-record runs (review 10). The share is now corrected for the fill's chance hits, and a filter
    whose false rate passes MAX_FALSE_RATE is not used."""
    import secrets

    from mepf.embed.fingerprint import MAX_FALSE_RATE, TagFilter

    f = TagFilter(1 << 10)  # 32 Kbit
    shared = [secrets.randbits(128) for _ in range(400)]
    f.add(shared)
    earlier = shared + [secrets.randbits(128) for _ in range(600)]  # 40% of the earlier sample is here
    fills = []
    for more in (0, 2000, 4000):
        f.add([secrets.randbits(128) for _ in range(more)])
        fills.append(f.false_rate())
        if f.false_rate() <= MAX_FALSE_RATE:
            assert abs(f.share_within(earlier) - 0.4) < 0.06, (f.false_rate(), f.share_within(earlier))
        else:
            assert f.share_within(earlier) == 0.0
    assert fills[0] < 1e-6 < fills[1] <= MAX_FALSE_RATE < fills[2]
