"""The child process of the release reader: checks a release's structure and reads its variable-length
strings under a cap on memory and CPU time, and prints the result as JSON (artifacts/format.py,
_inspect_in_child). `python -m mepf.artifacts.inspect FD PATH`, FD an open descriptor of the file."""
from __future__ import annotations

import json
import resource
import sys


def main() -> None:
    from .format import INSPECT_MEMORY, INSPECT_SECONDS

    resource.setrlimit(resource.RLIMIT_AS, (INSPECT_MEMORY, INSPECT_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (INSPECT_SECONDS, INSPECT_SECONDS))
    fd, path = int(sys.argv[1]), sys.argv[2]
    from .errors import MepfError
    from .format import inspect_fd

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
