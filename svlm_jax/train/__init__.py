"""Overlapped-chunk SFT (docs/method.md §5): data (samples -> chunks -> bucketed batches), the
jit-compiled sharded step, Orbax checkpoints, the config file and the training / export entries."""
