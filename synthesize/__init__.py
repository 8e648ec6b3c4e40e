"""Stage 2: generators trained from the released file alone. Imports no data reader."""

__all__ = ["TrainedGenerator", "load_generator"]


def __getattr__(name):  # torch loads only when a generator is used: `mepf --help` and `mepf audit` stay light
    if name in __all__:
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
