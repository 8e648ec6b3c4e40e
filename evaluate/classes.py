"""Which synthetic class is which reference class: by name (a release's names, or the folders `mepf sample`
wrote from them), by an explicit --class-map, or by index only where a side has no names (an .npz). Never
silently by position: names that cannot be matched are refused, listing both sets."""
from __future__ import annotations

import numpy as np

from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import printable
from mepf.synthesize.sampling import class_folders


def sampled_names(folder_names) -> list | None:
    """The sanitised class names behind folders written by `mepf sample` (INDEX_NAME with indices 0..K-1 in
    order, as class_folders makes them), or None for folders named otherwise."""
    if not folder_names:
        return None
    width = len(str(len(folder_names) - 1))
    out = []
    for i, name in enumerate(folder_names):
        prefix = f"{i:0{width}d}"
        if name == prefix:
            out.append("")
        elif name.startswith(prefix + "_"):
            out.append(name[len(prefix) + 1:])
        else:
            return None
    return out


def _key(name: str) -> str:
    """A name as `mepf sample` writes it into a folder name, lower-cased: what a name and its folder share."""
    folder = class_folders([name])[0]
    return folder[2:].lower() if folder.startswith("0_") else ""


def shown_names(names) -> str:
    names = [printable(n, 30) for n in names]
    return "{" + ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") + "}"


def parse_class_map(text: str | None) -> dict:
    """--class-map 'SYNTH=REF,SYNTH=REF': names on both sides, as each side lists them."""
    out = {}
    for part in filter(None, (text or "").split(",")):
        a, sep, b = part.partition("=")
        if not sep or not a.strip() or not b.strip():
            raise MepfError(f"--class-map {text!r}: give SYNTH=REF pairs separated by commas, e.g. 'Class A=benign'")
        out[a.strip()] = b.strip()
    return out


def match_classes(synth_names: list, synth_index: bool, synth_sampled, ref_names: list, ref_index: bool,
                  class_map: str | None = None) -> tuple:
    """(perm, mapping, how): perm[i] is the reference label of synthetic class i; mapping {synthetic name:
    reference name}; how: in words, how they were matched (recorded in the report)."""
    ks, kr = len(synth_names), len(ref_names)
    given = parse_class_map(class_map)
    if given:
        index = {n: i for i, n in enumerate(synth_names)}
        if synth_sampled is not None:
            index.update({n: i for i, n in enumerate(synth_sampled) if n})
        unknown = [a for a in given if a not in index] + [b for b in given.values() if b not in ref_names]
        if unknown:
            raise MepfError(f"--class-map names {printable(unknown[0], 40)!r}, which is not a class of its side; "
                            f"synthetic {shown_names(synth_names)}, reference {shown_names(ref_names)}")
        perm = np.full(ks, -1)
        for a, b in given.items():
            perm[index[a]] = ref_names.index(b)
        if ks != kr or (perm < 0).any() or len(set(perm.tolist())) != ks:
            raise MepfError(f"--class-map must pair every synthetic class with a different reference class, all "
                            f"{ks} of them ({len(given)} pair{'s' if len(given) != 1 else ''} given; synthetic "
                            f"{shown_names(synth_names)}, reference {shown_names(ref_names)})")
        how = "by --class-map"
    elif synth_index or ref_index:
        if ks != kr:
            raise MepfError(f"the synthetic set has {ks} class{'es' if ks != 1 else ''}, the reference {kr} "
                            f"class{'es' if kr != 1 else ''}; accuracy needs the same label set")
        side = "synthetic .npz" if synth_index else "reference .npz"
        other = ref_names if synth_index else synth_names
        numbers = [str(i) for i in range(ks)]
        if not (synth_index and ref_index) and sorted(other) != sorted(numbers):
            named = printable(other[0], 30)
            example = f"0={named}" if synth_index else f"{named}=0"
            raise MepfError(f"the {side} has no class names (labels 0..{ks - 1}), the other side names its classes "
                            f"{shown_names(other)}; pass --class-map SYNTH=REF to pair them (e.g. '{example}'), as "
                            "pairing by position could be silently wrong")
        # classes named "0".."K-1" pair with those labels, whatever their order (folders "10", "2" sort as text)
        perm = (np.arange(ks) if synth_index and ref_index else
                np.array([ref_names.index(n) for n in numbers]) if synth_index else
                np.array([int(n) for n in synth_names]))
        how = f"by index (the {side} has no class names)"
    else:
        if sorted(synth_names) == sorted(ref_names):
            perm = np.array([ref_names.index(n) for n in synth_names])
        else:
            s_keys = [n.lower() for n in synth_sampled] if synth_sampled is not None else [_key(n) for n in synth_names]
            r_keys = [_key(n) for n in ref_names]
            if not (len(set(s_keys)) == ks == kr == len(set(r_keys)) and set(s_keys) == set(r_keys) and all(s_keys)):
                raise MepfError(f"class names do not match: synthetic {shown_names(synth_names)}, reference "
                                f"{shown_names(ref_names)}; name the reference's class folders as the release's "
                                "classes, or pass --class-map SYNTH=REF,... (accuracy with mismatched labels is "
                                "meaningless)")
            perm = np.array([r_keys.index(k) for k in s_keys])
        how = "by name"
    mapping = {str(synth_names[i]): str(ref_names[int(perm[i])]) for i in range(ks)}
    return perm, mapping, how
