"""Stage 2: generators trained from the released file alone. Imports no data reader."""
from .checkpoint import TrainedGenerator, load_generator

__all__ = ["TrainedGenerator", "load_generator"]
