"""The child process of the release reader: checks a release's structure and reads its variable-length
strings under a cap on memory and CPU time, and prints the result as JSON (artifacts/format.py,
_inspect_in_child). Started with `python -I -c ... PATHS FD PATH`, FD an open descriptor of the file."""
from __future__ import annotations

import json
import resource
import sys


def _address_space() -> int:
    """This process's virtual memory now, in bytes (0 where /proc does not tell)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def main() -> None:
    import h5py  # noqa: F401 - imported before the cap: the libraries' own mappings are not the file's doing
    import numpy  # noqa: F401

    from .errors import MepfError
    from .format import INSPECT_MEMORY, INSPECT_SECONDS, inspect_fd

    cap = _address_space() + INSPECT_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    resource.setrlimit(resource.RLIMIT_CPU, (INSPECT_SECONDS, INSPECT_SECONDS))
    fd, path = int(sys.argv[-2]), sys.argv[-1]
    try:
        out = {"ok": inspect_fd(fd, path)}
    except MepfError as e:
        out = {"error": str(e)}
    except MemoryError:
        out = {"error": f"{path} declares more data than a release holds (its strings claim more memory than the "
                        "file has); ask the data owner for the original file"}
    except Exception as e:  # noqa: BLE001 - anything else a hostile file makes h5py raise is one line
        out = {"error": f"{path} could not be read as an mepf release (truncated or corrupt?) ({type(e).__name__}); "
                        "ask the data owner for the original file"}
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
