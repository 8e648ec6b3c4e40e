"""Several ranks are one mechanism only if they agree on the plan: which records exist, in which order and
blocks, with which classes, feature map and guarantee. Each rank states its own plan; before any record is
read every rank compares it with rank 0's, field by field (as SHA-256 digests in tensors, never pickled),
and a disagreement is the same one-line error on every rank, naming the fields, never their values."""
from __future__ import annotations

import hashlib
import json
import os

from mepf.artifacts.errors import MepfError
from mepf.artifacts.versions import versions
from mepf.core import distributed

#: CPU features that decide which kernels oneDNN, MKL and ATen run, and the variables that override that choice
_ISA_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
              "asimd", "sve", "sve2")
_KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE",
               "DNNL_DEFAULT_FPMATH_MODE", "ONEDNN_CPU_ISA_HINTS", "DNNL_CPU_ISA_HINTS", "MKL_CBWR",
               "MKL_ENABLE_INSTRUCTIONS", "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE",
               "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")


#: the plan's fields, in order, named as the user knows them; what differs is said in these words
FIELDS = (
    ("version", "the versions of mepf, torch, numpy and Pillow (with its libjpeg-turbo and zlib)"),
    ("device", "the device (its kind; on CUDA the GPU model, compute capability, SM count, CUDA and cuDNN versions)"),
    ("cpu", "the CPU (its model and instruction-set flags, and ATen's choice among them)"),
    ("kernel_env", "the variables that choose kernels (" + ", ".join(_KERNEL_ENV[:3]) + ", ...)"),
    ("n", "the number of records listed"),
    ("block", "--batch-size (the block of records each rank reads)"),
    ("classes", "the class names (--classes, or the class folders)"),
    ("data", "the data itself (its listing, or its file's bytes)"),
    ("geometry", "the geometry (--image-size, --channels)"),
    ("features", "the feature map (--backbone, --weights, --layers, --pooling, --feature-size, --pixel-weight)"),
    ("moments", "--moments"),
    ("relation", "--relation"),
    ("target", "--epsilon and --delta"),
    ("split", "--budget-split"),
    ("force", "--force"),
    ("bad_records", "--bad-records"),
)


def plan_of(source, transform, feature_spec: dict, *, batch_size: int, moments: str, relation: str,
            epsilon: float, delta: float, budget_split, force: bool, device="cpu", bad_records: str = "stop") -> dict:
    """This rank's plan. The data digest covers the listing and the bytes of the files a source reads (one read
    of them): it is computed under torchrun only, and there by one rank per node (local rank 0; the node's
    other ranks share its files and command line, and state no digest)."""
    ranks = distributed.current()
    return {
        "version": {**versions("mepf", "torch", "numpy", "Pillow"), **decoders()},
        **kernels(device),
        "n": len(source),
        "block": int(batch_size),
        "classes": list(source.classes) if source.classes is not None else None,
        "data": source.listing_digest() if ranks.active and ranks.local_rank == 0 else None,
        "geometry": transform.spec(),
        "features": feature_spec,
        "moments": moments,
        "relation": relation,
        "target": [repr(float(epsilon)), repr(float(delta))],
        "split": budget_split,
        "force": bool(force),
        "bad_records": bad_records,
    }


def decoders() -> dict:
    """The libraries Pillow turns a stored record into pixels with (mepf decodes PNG and JPEG only): as for the
    kernels below, nodes that decode one file to other pixels would move other records' rows when a record is
    added (review 38). Pillow's wheels bundle their own, so its version alone does not say which a build has."""
    from PIL import features

    return {name: features.version(name) for name in ("libjpeg_turbo", "zlib", "zlib_ng")}


def kernels(device) -> dict:
    """The plan's fields `device`, `cpu` and `kernel_env`: what decides the float rounding of a record's features
    besides the record, the device kind and its kernel path. Ranks that differ here give the same record rows that
    differ in their last bits, and since a record added at the start moves the block boundaries (block b goes to
    rank b % world), others' rows would change with it: the sensitivity would no longer bound the change. So every
    rank must state the same."""
    import torch

    device = torch.device(device)
    found = {"device": [device.type], "kernel_env": {k: os.environ[k] for k in _KERNEL_ENV if k in os.environ},
             "cpu": [_cpu_flags(), torch.backends.cpu.get_cpu_capability(),
                     bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)]}
    if device.type == "cuda":  # cuBLAS is bitwise reproducible only on one architecture and SM count (a MIG slice)
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        found["device"] += [props.name, [props.major, props.minor], props.multi_processor_count, torch.version.cuda,
                            torch.backends.cudnn.version()]
    return found


def _cpu_flags() -> list | None:
    """The CPU's model and the instruction-set flags kernels dispatch on (oneDNN's and MKL's blocking also follow
    the model's caches); Linux, None elsewhere."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if model is None and line.startswith(("model name", "CPU part")):
                    model = line.split(":", 1)[1].strip()
                if flags is None and line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    flags = [flag for flag in _ISA_FLAGS if flag in have]
                if model is not None and flags is not None:
                    break
    except OSError:
        return None
    return [model, flags]


def _digest(key: str, value) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(f"mepf-plan-v1|{key}|{text}".encode()).digest()


#: a rank that states no data digest (not its node's first): compared on every other field
NO_DATA = _digest("data", None)


def digests(plan: dict) -> list:
    """One SHA-256 per field, in FIELDS order."""
    return [_digest(key, plan[key]) for key, _ in FIELDS]


def disagreement(rows: list) -> str | None:
    """Given every rank's digests (rank order), the one error all ranks raise, or None when all agree."""
    ranks, fields = [], []
    for r, row in enumerate(rows[1:], 1):
        differ = [name for (key, name), mine, main in zip(FIELDS, row, rows[0])
                  if mine != main and not (key == "data" and mine == NO_DATA)]
        if len(row) != len(rows[0]):
            differ = differ or [FIELDS[0][1]]
        if differ:
            ranks.append(r)
            fields += [f for f in differ if f not in fields]
    if not ranks:
        return None
    which = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    kind = ", on machines of one kind with the same variables"
    return (f"rank{'s' if len(ranks) > 1 else ''} {which} disagree{'' if len(ranks) > 1 else 's'} with rank 0 on "
            f"{'; '.join(fields)}; nothing was read or released: start every node with the same options and the same "
            "copy of the data" + (kind if {dict(FIELDS)[k] for k in ("device", "cpu", "kernel_env")} & set(fields)
                                  else ""))


def agree_on_plan(plan: dict) -> None:
    """Before any record is read: every rank's plan must be rank 0's, or every rank raises the same error."""
    if not distributed.current().active:
        return
    rows = distributed.all_gather_bytes(b"".join(digests(plan)), 32 * len(FIELDS))
    error = disagreement([[row[i:i + 32] for i in range(0, len(row), 32)] for row in rows])
    if error:
        raise MepfError(error)


def files_disagreement(rows: list) -> str | None:
    """Given every rank's (node, local rank, digest of its source's file identities), the one error all ranks raise
    when a node's ranks are not numbered 0..m-1 (a launcher's LOCAL_RANK wrong: a node without local rank 0
    digests no data, so its data would never be compared with rank 0's), or when two ranks of one node found
    different files; else None."""
    nodes = distributed.nodes_of(rows)
    error = distributed.numbering_problem(rows)
    if error:
        return error
    ranks = sorted(r for group in nodes.values() for r, _, d in group if d != group[0][2])
    if not ranks:
        return None
    which = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return (f"rank{'s' if len(ranks) > 1 else ''} {which} found other data files than the first rank of their node "
            "(replaced or rewritten while the ranks started); nothing was read or released: run again on data that is "
            "not being modified")


def agree_on_files(source) -> None:
    """The ranks of one node each open the data's files by path, and only the node's first rank digests their
    bytes (plan_of): a file replaced between two ranks' starts would have them read different records at the same
    positions, one record twice. Before any record is read, the ranks of each node compare the identities (device,
    inode, size, mtime, ctime) of the files they found; reads then check that every open finds the same file."""
    r = distributed.current()
    if not r.active:
        return
    ident = hashlib.sha256(repr(source.file_identity()).encode()).digest()
    rows = distributed.all_gather_bytes(distributed.node_row(r) + ident, 48)
    error = files_disagreement(rows)  # the numbering too, though distributed.join has refused a misnumbered launch
    if error:
        raise MepfError(error)
