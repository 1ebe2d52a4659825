"""Training data: sources, the patch pipeline, and the trainer's entry point `build_input`."""
from patchdiff.data.sources import InputIterator, build_input  # noqa: F401
