"""What a reader of someone else's release enforces before it trusts a value: the types and bounds of the
specs and the ledger, and names safe to use as a path component. Each check returns the first problem in
words (or None), so that every reader refuses a hostile file in one line, never with a traceback.
Documented in docs/artifact-format.md ("What a reader enforces")."""
from __future__ import annotations

import math
import re

from .accounting import MIN_DELTA
from .ledger import (
    ACCOUNTANT,
    COMPOSITION,
    KEYS,
    MECHANISM,
    NOISE,
    POST_PROCESSING,
    RELATION_TEXT,
    RELATIONS,
    SENSITIVITY_RULES,
)

#: at most this many classes (the K of every array); the release's shapes are bounded by it
MAX_CLASSES = 10_000
#: the longest class name, in characters
MAX_NAME = 256
#: image sides (the input geometry and the feature map's working size) lie in this range, as the CLI's
GEOMETRY = (8, 1024)
#: the largest feature dimension D a reader accepts (VGG19's 16 layers at 1024 px are about 3e8)
MAX_DIM = 1 << 31
#: the longest JSON text (feature_spec, data_spec, ledger), in bytes
MAX_TEXT = 1 << 20
MOMENT_SETS = ("mean", "mean+second")
RELEASE_NAMES = ("S1", "S2", "counts")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


#: the conv generators start at a quarter of the side: beyond this side their first layer (about 0.2 x 10^9
#: weights at 512 px) is more than a generator needs; larger sides are resnet's
CONV_MAX_SIDE = 512
#: the largest start the resnet generator upsamples from (its sides are start x 2^k, k >= 1)
RESNET_MAX_START = 15


def resnet_start(side: int) -> tuple | None:
    """(start, doublings) of the resnet generator at `side` = start x 2^doublings, the start the smallest such of at
    least 4 and at most RESNET_MAX_START, doublings at least 1 (4 x 2^k at powers of two); None where it draws none."""
    start, ups = side, 0
    while start % 2 == 0 and start // 2 >= 4:
        start, ups = start // 2, ups + 1
    return (start, ups) if ups >= 1 and start <= RESNET_MAX_START else None


def trainable_geometry_problem(height: int, width: int) -> str | None:
    """Why no mepf generator can be trained at height x width images, or None. Stage 2 draws square images of a side
    divisible by 4 (conv up to CONV_MAX_SIDE; resnet at start x 2^k, see resnet_start); embed refuses another
    geometry before it spends the budget."""
    if height != width:
        return f"mepf's generators draw square images, not {height}x{width}"
    if height % 4:
        return f"mepf's generators draw images of a side divisible by 4, not {height}"
    if height > CONV_MAX_SIDE and resnet_start(height) is None:
        return (f"mepf's generators draw sides above {CONV_MAX_SIDE} px only as s x 2^k with s at most "
                f"{RESNET_MAX_START} (resnet: e.g. 640, 768, 896, 1024), not {height}")
    return None


def name_problem(name) -> str | None:
    """Why `name` cannot be a class name: it must be a non-empty string of printable characters, not `.` or
    `..`, and not too long. (A '/' is allowed, as in Fashion-MNIST's 'T-shirt/top': mepf never uses a class
    name as a path; sample folders are named from the index and a sanitised name.)"""
    if not isinstance(name, str) or not name.strip():
        return "an empty class name"
    if name in (".", ".."):
        return f"the class name {name!r}"
    if _CONTROL.search(name) or not name.isprintable():
        return "a class name with control or unprintable characters"
    if len(name) > MAX_NAME:
        return f"a class name longer than {MAX_NAME} characters"
    return None


def class_names_problem(names) -> str | None:
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES:
        return f"class names that are not a list of 1 to {MAX_CLASSES:,} names"
    for n in names:
        problem = name_problem(n)
        if problem:
            return problem
    if len(set(names)) != len(names):
        return "the same class name twice"
    return None


def _int(v, lo, hi) -> bool:
    return type(v) is int and lo <= v <= hi


def _num(v, lo=-math.inf, hi=math.inf, open_lo=False) -> bool:
    """A finite JSON number (not a bool) within [lo, hi] (or (lo, hi])."""
    if type(v) not in (int, float) or not math.isfinite(v):
        return False
    return (v > lo if open_lo else v >= lo) and v <= hi


def _str(v, longest=4096) -> bool:
    return isinstance(v, str) and len(v) <= longest


def feature_spec_problem(spec) -> str | None:
    if not isinstance(spec, dict):
        return "a feature_spec that is not a JSON object"
    lo, hi = GEOMETRY
    inp = spec.get("input")
    checks = [
        ("backbone", _str(spec.get("backbone"), 64)),
        ("weights", spec.get("weights") in ("pretrained", "random", "file")),
        ("weight_source", _str(spec.get("weight_source"))),
        ("weight_seed", spec.get("weight_seed") is None or _int(spec.get("weight_seed"), 0, 2 ** 63)),
        ("weights_sha256", isinstance(spec.get("weights_sha256"), str)
         and re.fullmatch(r"[0-9a-f]{64}", spec["weights_sha256"]) is not None),
        ("layers", isinstance(spec.get("layers"), list) and 1 <= len(spec["layers"]) <= 256
         and all(_str(x, 64) for x in spec["layers"])),
        ("pixel_weight", spec.get("pixel_weight") is None or _num(spec.get("pixel_weight"), 0, open_lo=True)),
        ("pooling", spec.get("pooling") in ("none", "mean")),
        ("input", isinstance(inp, dict) and _int(inp.get("height"), lo, hi) and _int(inp.get("width"), lo, hi)
         and inp.get("channels") in (1, 3) and type(inp.get("channels")) is int),
        ("preprocessing", _str(spec.get("preprocessing"))),
        ("C1", _num(spec.get("C1"), 0, 1e6, open_lo=True)),
        ("C2", _num(spec.get("C2"), 0, 1e6, open_lo=True)),
        ("dim", _int(spec.get("dim"), 1, MAX_DIM)),
    ]
    for key, ok in checks:
        if not ok:
            return f"a feature_spec whose {key} is missing or out of bounds"
    r = spec.get("resize")
    if r is not None and not (isinstance(r, dict) and _int(r.get("height"), inp["height"], hi)
                              and _int(r.get("width"), inp["width"], hi)):
        return f"a feature_spec whose resize is not a size from the input's to {hi}"
    return None


def data_spec_problem(spec, k: int, feature_spec: dict) -> str | None:
    if not isinstance(spec, dict):
        return "a data_spec that is not a JSON object"
    t, inp = spec.get("transform"), feature_spec["input"]
    if not (_str(spec.get("dataset"), 256) and isinstance(spec.get("labelled"), bool)
            and _int(spec.get("num_classes"), 1, MAX_CLASSES) and spec.get("moments") in MOMENT_SETS):
        return "a data_spec whose dataset, labelled, num_classes or moments is missing or out of bounds"
    if spec["num_classes"] != k or (not spec["labelled"] and k != 1):
        return "a data_spec whose num_classes is not the number of class names"
    if not (isinstance(t, dict) and t.get("image_size") == [inp["height"], inp["width"]]
            and t.get("channels") == inp["channels"]):
        return "a data_spec whose geometry is not the feature_spec's input"
    return None


def ledger_problem(led) -> str | None:
    """The ledger's structure and the type and range of every number the audit computes with."""
    if not isinstance(led, dict):
        return "a ledger that is not a JSON object"
    if not isinstance(led.get("private"), bool) or led.get("relation") not in RELATIONS:
        return "a ledger whose private or relation is missing or unknown"
    releases = led.get("releases")
    if not isinstance(releases, list) or not 1 <= len(releases) <= len(RELEASE_NAMES):
        return "a ledger without a list of releases"
    private = led["private"]
    for r in releases:
        if not isinstance(r, dict) or r.get("name") not in RELEASE_NAMES:
            return "a ledger release that is not S1, S2 or counts"
        if not (_str(r.get("mechanism"), 256) and _str(r.get("sensitivity_formula"), 64)
                and isinstance(r.get("shape"), list) and all(_int(x, 0, MAX_DIM) for x in r["shape"])):
            return f"a ledger release {r['name']} without its mechanism, formula or shape"
        if not (_num(r.get("sensitivity"), 0, 1e12, open_lo=True) and _num(r.get("weight"), 0, 1)):
            return f"a ledger release {r['name']} whose sensitivity or weight is out of bounds"
        sigma = r.get("sigma")
        if not (_num(sigma, 1e-12 * r["sensitivity"], 1e18, open_lo=True) if private else sigma == 0):
            return f"a ledger release {r['name']} whose sigma is out of bounds"
    if len({r["name"] for r in releases}) != len(releases):
        return "a ledger that names a release twice"
    target, achieved = led.get("target"), led.get("achieved")
    if not (isinstance(target, dict) and isinstance(achieved, dict)):
        return "a ledger without its target and achieved guarantee"
    words = ledger_words_problem(led)
    if words:
        return words
    if not all(_num(d.get("delta"), MIN_DELTA, 1) and d["delta"] < 1 for d in (target, achieved)):
        return f"a ledger whose delta is not a number in [{MIN_DELTA:g}, 1), what mepf calibrates"
    if private:
        if not (_num(led.get("mu"), 0, 1e6, open_lo=True) and _num(target.get("epsilon"), 0, 1e6, open_lo=True)
                and _num(achieved.get("epsilon"), 0, 1e6)):
            return "a ledger whose mu or epsilon is not a finite positive number"
        if not _num(achieved.get("epsilon_closed_form"), 0, 1e6):
            return "a ledger whose closed-form epsilon is not a finite number"
    elif not (led.get("mu") is None and target.get("epsilon") is None and achieved.get("epsilon") is None
              and achieved.get("epsilon_closed_form") is None):
        return "a non-private ledger that states a guarantee"
    return None


def ledger_words_problem(led: dict) -> str | None:
    """The ledger's keys and fixed words as mepf writes them for its relation (what a person reading the file sees
    must be what the numbers mean); only the accountant's version may differ. For a ledger whose structure was
    checked up to its target and achieved."""
    relation, private = led["relation"], led["private"]
    if set(led) != KEYS["ledger"] or any(set(r) != KEYS["release"] for r in led["releases"]) or any(
            not isinstance(led[k], dict) or set(led[k]) != KEYS[k] for k in ("accountant", "target", "achieved")):
        return "a ledger whose keys are not those mepf writes"
    wrong = [k for k, v in (("relation_text", RELATION_TEXT[relation]), ("composition", COMPOSITION),
                            ("noise", NOISE), ("post_processing", POST_PROCESSING)) if led[k] != v]
    if any(led["accountant"][k] != v for k, v in ACCOUNTANT.items()) or not _str(led["accountant"]["version"], 64):
        wrong.append("accountant")
    for r in led["releases"]:
        formula = SENSITIVITY_RULES[relation][r["name"]][0]
        if r["mechanism"] != MECHANISM[private] or r["sensitivity_formula"] != formula:
            wrong.append(f"{r['name']}'s mechanism or sensitivity formula")
    if wrong:
        return (f"a ledger whose {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not what mepf writes for a "
                f"{'private' if private else 'non-private'} {relation} release")
    return None
