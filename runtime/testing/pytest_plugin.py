"""pytest plugin (``-p mofa_omni.testing.pytest_plugin``): run the test session on OpenBLAS.

Loaded through ``-p`` it is imported before pytest captures output, so the
one-time re-exec of :func:`mofa_omni.models.compute.ensure_fast_blas` keeps the
terminal's file descriptors.
"""

from mofa_omni.models.compute import ensure_fast_blas

ensure_fast_blas()
