"""mofa-omni: every inference model as a first-class node of a dora-rs dataflow."""

__version__ = "0.1.0"
