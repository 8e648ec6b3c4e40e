"""The names of the files in a training run folder, in one place (stage 2 writes them, stage 3 reads them)."""
import re

OPTIONS = "options.json"  # every resolved option, the release's SHA-256, eps and delta, versions
STATS = "stats.jsonl"  # one JSON record every --log-every steps
LOG = "log.txt"
GENERATOR = "generator.pt"  # the result: architecture, weights, the guarantee it inherits
SNAPSHOT_GLOB = "snapshot-*.pt"
SNAPSHOT_NAME = re.compile(r"snapshot-(\d{7})\.pt")  # what snapshot_name writes; any other file is not one


def snapshots(run) -> list:
    """(step, path) of the run's snapshots, by step."""
    from pathlib import Path

    found = []
    for p in Path(run).glob(SNAPSHOT_GLOB):
        m = SNAPSHOT_NAME.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:07d}.pt"


def grid_name(step: int) -> str:
    return f"grid-{step:07d}.png"
