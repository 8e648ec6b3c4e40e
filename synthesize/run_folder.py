"""The names of the files in a training run folder, in one place (stage 2 writes them, stage 3 reads them)."""
OPTIONS = "options.json"  # every resolved option, the release's SHA-256, eps and delta, versions
STATS = "stats.jsonl"  # one JSON record every --log-every steps
LOG = "log.txt"
GENERATOR = "generator.pt"  # the result: architecture, weights, the guarantee it inherits
SNAPSHOT_GLOB = "snapshot-*.pt"


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:07d}.pt"


def grid_name(step: int) -> str:
    return f"grid-{step:07d}.png"
