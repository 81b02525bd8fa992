"""Overlapped-chunk SFT (METHOD.md §4): data (samples -> chunks -> bucketed batches), the
jit-compiled sharded step, Orbax checkpoints, the config file and the training / export entries."""
