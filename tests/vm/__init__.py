"""The kernel matrix: the test suite on the host kernel and on Debian's 6.1 and 6.12 under qemu.

``python -m tests.vm`` (``make test-kernels``) installs what it needs (qemu, virtme-ng), fetches
the kernels into a cache, boots each with virtme-ng on the host's file system, runs pytest inside
with the :mod:`tests.vm.report` plugin, prints a kernel x backend matrix and fails when a test
fails anywhere, when a test is skipped on every kernel, or when a backend passes nowhere.
See ``tests/vm/README.md``.
"""

BACKENDS: tuple[str, ...] = ("uffd-async", "soft-dirty", "uffd-sync", "mprotect", "compare")
