"""Arrays that layers reuse for their outputs and input gradients.

A training step of a convolutional network allocates tens of megabytes per layer;
fresh memory from the operating system costs a page fault for every 4 KB touched,
step after step.  The pool keeps the arrays it handed out and hands one out again
once nothing else refers to it any more: no layer, saved state, view or user
variable.  Python's reference count says so, so reuse is never visible: an array
you hold is never overwritten.  Arrays that were not asked for during the last
few top-level calls are let go, so a change of batch size does not pin memory.
One pool per thread.
"""
import sys
import threading

import numpy as np

IDLE_CALLS = 4   # let an array go after this many top-level calls without use


def _references(bucket, index):
    return sys.getrefcount(bucket[index])


def _baseline():
    """The reference count _references sees for an array held by the pool alone
    (measured: it depends on the interpreter)."""
    return _references([np.empty(0)], 0)


_FREE = _baseline()


class _Pool(threading.local):
    def __init__(self):
        self.buckets = {}      # (shape, dtype) -> [array, ...]
        self.last_used = {}    # id(array) -> the call count when it was last handed out
        self.calls = 0

    def get(self, shape, dtype):
        key = (tuple(shape), np.dtype(dtype))
        bucket = self.buckets.setdefault(key, [])
        for i in range(len(bucket)):
            if _references(bucket, i) == _FREE:
                self.last_used[id(bucket[i])] = self.calls
                return bucket[i]
        array = np.empty(key[0], key[1])
        bucket.append(array)
        self.last_used[id(array)] = self.calls
        return array

    def end_call(self):
        """After a top-level call: let go of the free arrays that sat idle too long."""
        self.calls += 1
        for key in list(self.buckets):
            bucket = self.buckets[key]
            for i in range(len(bucket) - 1, -1, -1):
                if self.calls - self.last_used[id(bucket[i])] > IDLE_CALLS and \
                        _references(bucket, i) == _FREE:
                    del self.last_used[id(bucket[i])]
                    del bucket[i]
            if not bucket:
                del self.buckets[key]


_pool = _Pool()


def reusable_array(shape, dtype):
    """An (uninitialised) array of this shape and dtype, reused when one is free."""
    return _pool.get(shape, dtype)


def end_top_level_call():
    _pool.end_call()


def fill_free(value):
    """Fill every free array of this thread's pool with ``value``: the tests poison
    reused memory with NaN to show that kernels overwrite every element."""
    for bucket in _pool.buckets.values():
        for i in range(len(bucket)):
            if _references(bucket, i) == _FREE:
                bucket[i].fill(value)
