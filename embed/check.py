"""`mepf embed --check`: find every file of the data that the pass would stop at (not an image, cannot be
decoded, a value or label out of range), listing them all at once; it reads the data, releases nothing and
writes nothing. It names files, never a count."""
from __future__ import annotations

from mepf.artifacts.errors import MepfError
from mepf.progress import progress

from .files import FolderSource
from .sources import declared_geometry, open_source, parse_classes, refuse_untrainable


def check_data(data: str, classes: str | None = None, data_root=None, show_progress: bool = True,
               image_size=None, channels=None) -> list:
    """One line per problem, in listing order; empty when the data can be embedded as it is (with the geometry
    options given: an array of 7 x 7 images needs --image-size)."""
    source = open_source(data, parse_classes(classes), data_root, strict=False)
    problems = [f"{p}: {'a folder inside a class folder (not read)' if p.is_dir() else 'not a PNG or JPEG image'}"
                for p in getattr(source, "not_images", [])]
    if isinstance(source, FolderSource):
        try:  # the folder's geometry is the options' (the pass reads none from an image)
            if image_size is not None:
                refuse_untrainable(image_size)
        except MepfError as e:
            problems.insert(0, str(e))
        with progress(total=len(source), desc="check", disable=not show_progress, counts=False) as bar:
            for i in range(len(source)):
                try:
                    source.read_listed(i)
                except MepfError as e:
                    problems.append(str(e))
                bar.update(1)
        return problems
    try:
        declared_geometry(source, image_size, channels)
    except MepfError as e:
        return [str(e)]
    try:  # arrays and named datasets stop at their first bad block, as the pass would
        for _ in source.blocks(1024):
            pass
    except MepfError as e:
        problems.append(str(e))
    except Exception as e:  # noqa: BLE001 - a reader's failure (a damaged compressed chunk): one line, as the pass
        problems.append(f"{data}: reading it failed ({type(e).__name__}); the file may be damaged: make it again "
                        "from the originals")
    return problems
