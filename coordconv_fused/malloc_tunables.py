"""glibc's malloc returns large freed buffers to the OS and faults them in again on every call, which
inflates the time of small convolutions several-fold; the benchmarks run with these settings."""

GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
