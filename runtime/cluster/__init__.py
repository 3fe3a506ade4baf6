"""Several machines: a local multi-daemon cluster and recovery of a lost machine's graph."""
