"""Public entry points of the FID Inception-v3 (the code lives in `patchdiff.nn.inception`)."""
from patchdiff.nn.inception import default_weights_path, features, load_weights  # noqa: F401
