"""Another process, cut by concern (as ``backends/`` is for this process's own memory).

``target``      the watched program: /proc facts about it, and the memory a tracker is bound to
``attach``      a userfaultfd of the target's own, by ptrace injection from a helper process
``freeze``      every thread of the target stopped for an instant (soft-dirty resets)
``uffd_async``  the uffd-async method: register, protect, collect with PAGEMAP_SCAN
``soft_dirty``  the soft-dirty method: bits read and reset under a freeze
``result``      ProcessDirty, SkippedMapping, TargetExec
``tree``        a command traced from its first instruction, and its process tree

:class:`pagewatch.ProcessTracker` (``pagewatch/process.py``) is the facade over them.  This
package's ``__init__`` imports nothing, so ``tree`` loads without numpy (the CLI's --help).
"""
