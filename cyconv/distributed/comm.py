"""The communicator of a data-parallel run: MPI collectives in a fixed order, watched.

Every blocking wait runs under the :class:`~cyconv.distributed.watchdog.Watchdog`,
which ends the whole job (naming the rank) when a rank stops sending heartbeats
or when a collective does not complete in time: a dead or stuck rank never
leaves the others hanging.

Sums are deterministic.  The gradient sums (:meth:`Communicator.start_sum`) are
MPI allreduces of float64 values, whose algorithm Open MPI picks from the message
size and the number of ranks alone; and float32 gradients (times a batch size)
summed in float64 are exact unless their magnitudes spread over more than 2^29, so
that the order of the additions does not matter there.  Every other sum
(:meth:`Communicator.sum_rows`) gathers every rank's row and adds them in rank
order.  The same seed and number of ranks give bitwise the same run, and every
rank gets the same bits.
"""
import atexit
import hashlib
import json
import os
import socket
import sys
import time
from collections import Counter

import numpy as np

from cyconv.distributed.watchdog import FAILURE_EXIT_CODE, Watchdog


class RanksDisagree(ValueError):
    """The ranks of a run were given different data, settings or models."""


def mpi():
    """The mpi4py MPI module, or ImportError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError("cyconv.distributed needs mpi4py and an MPI library: "
                          'pip install -e ".[mpi]" (mpi4py and Open MPI from pip) '
                          f"({error})") from None
    return MPI


class Communicator:
    """One rank's view of the run: ``rank``, ``size``, and the collectives the
    distributed classes use.  Make it with :func:`cyconv.distributed.init`.

    ``waited`` counts the seconds spent waiting in each kind of collective
    (``"gradients"``, ``"batch_norm"``, ...): the time a rank did nothing but
    wait for the others or for the network.
    """

    def __init__(self, comm, watchdog):
        self.comm, self.watchdog = comm, watchdog
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.waited = Counter()

    @property
    def is_root(self):
        """True on rank 0, the rank that writes files and prints."""
        return self.rank == 0

    def dup(self):
        """A communicator of its own over the same ranks (its collectives never mix with
        this one's), watched by the same watchdog."""
        comm = self.comm.Dup()
        comm.Set_errhandler(mpi().ERRORS_RETURN)
        return Communicator(comm, self.watchdog)

    # -- waiting ---------------------------------------------------------------------
    def wait(self, requests, what, kind):
        """Wait for nonblocking operations; ``what`` names them if they never complete."""
        start = time.perf_counter()
        with self.watchdog.blocking(what):
            mpi().Request.Waitall(requests)
        self.waited[kind] += time.perf_counter() - start

    def _run(self, start, what, kind):
        """Start a nonblocking collective with ``start()`` and wait for it."""
        self.wait([start()], what, kind)

    # -- collectives ----------------------------------------------------------------------
    def broadcast(self, arrays, what="the initial state"):
        """Copy rank 0's values into ``arrays`` (contiguous numpy arrays) on every rank."""
        arrays = list(arrays)
        for array in arrays:
            if not array.flags.c_contiguous:
                raise ValueError(f"broadcast: expected contiguous arrays, got one of shape "
                                 f"{array.shape}")
        requests = [self.comm.Ibcast(array, root=0) for array in arrays]
        self.wait(requests, f"the broadcast of {what}", "broadcast")

    def max(self, value, what):
        """The largest of the ranks' integers."""
        buffer = np.array([value], np.int64)
        self._run(lambda: self.comm.Iallreduce(mpi().IN_PLACE, buffer, op=mpi().MAX),
                  what, "control")
        return int(buffer[0])

    def gather(self, row, what, kind):
        """(size, len(row)) float64: every rank's row, in rank order."""
        row = np.ascontiguousarray(row, dtype=np.float64).reshape(-1)
        rows = np.empty((self.size, row.size), np.float64)
        self._run(lambda: self.comm.Iallgather(row, rows), what, kind)
        return rows

    def sum_rows(self, row, what, kind):
        """The sum of every rank's ``row`` (float64), added in rank order."""
        return self.gather(row, what, kind).sum(axis=0)

    def start_sum(self, buffer):
        """Start an in-place float64 sum of ``buffer`` over the ranks; returns the request
        (finish it with :meth:`wait`)."""
        return self.comm.Iallreduce(mpi().IN_PLACE, buffer, op=mpi().SUM)

    def all_objects(self, value, what):
        """Every rank's ``value`` (any picklable object), in rank order."""
        start = time.perf_counter()
        with self.watchdog.blocking(what):
            values = self.comm.allgather(value)
        self.waited["control"] += time.perf_counter() - start
        return values

    def check_same(self, what, **values):
        """Raise :class:`RanksDisagree` on every rank unless every rank passed equal
        ``values`` (JSON-able; compared by hash), naming the values and ranks that differ."""
        digests = {name: hashlib.sha256(json.dumps(value, sort_keys=True, default=repr)
                                        .encode()).hexdigest() for name, value in values.items()}
        every = self.all_objects(digests, f"the comparison of {what}")
        differ = {name: [rank for rank, theirs in enumerate(every) if theirs.get(name) != digest]
                  for name, digest in every[0].items()}
        problems = [f"{name} (rank{'s' if len(ranks) > 1 else ''} "
                    f"{', '.join(map(str, ranks))} differ{'' if len(ranks) > 1 else 's'} from "
                    "rank 0)" for name, ranks in differ.items() if ranks]
        if problems:
            raise RanksDisagree(f"the ranks disagree on {what}: {'; '.join(problems)}. Every "
                                "rank must run the same command on the same data.")

    def close(self):
        """Stop the watchdog (then MPI may finalize)."""
        self.watchdog.stop()


def _abort_on_uncaught_exception(world):
    """An exception that ends one rank ends the job (else the others would wait for it)."""
    previous = sys.excepthook

    def hook(kind, error, traceback):
        previous(kind, error, traceback)
        sys.stderr.flush()
        world.Abort(1)

    sys.excepthook = hook


_world = None


def init(heartbeat_timeout=30.0, collective_timeout=600.0):
    """The :class:`Communicator` of this MPI job (MPI.COMM_WORLD).

    Starts the watchdog: each rank sends a heartbeat every second to the next
    rank, which ends the job with an error naming the silent rank after
    ``heartbeat_timeout`` seconds without one; a collective that does not
    complete within ``collective_timeout`` seconds (a rank waiting for another
    that runs different code) ends it too.  An uncaught exception on any rank
    ends the job at once (MPI_Abort) instead of leaving the others waiting.
    Calling init again returns the same communicator.
    """
    global _world
    if _world is not None:
        return _world
    MPI = mpi()
    world = MPI.COMM_WORLD.Dup()
    world.Set_errhandler(MPI.ERRORS_RETURN)
    places = world.allgather((os.getpid(), socket.gethostname()))
    watchdog = Watchdog(world.Dup(), places, heartbeat_timeout, collective_timeout,
                        lambda: MPI.COMM_WORLD.Abort(FAILURE_EXIT_CODE))
    watchdog.start()
    _abort_on_uncaught_exception(MPI.COMM_WORLD)
    _world = Communicator(world, watchdog)
    atexit.register(_world.close)   # before mpi4py's MPI_Finalize (registered earlier)
    return _world
