"""mofa-omni: every inference model as a first-class node of a dora-rs dataflow."""

__version__ = "0.1.0"

import os as _os

# transformers (used for tokenizers only) advises at import that torch is missing: we never need it.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
