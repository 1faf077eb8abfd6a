"""The watchdog of a distributed run: heartbeats around the ring of ranks, and a
deadline for the collective the main thread waits in.

A launcher such as mpirun ends the job when a rank's process exits, but a rank
that hangs (stopped, deadlocked, its machine unreachable) would leave the others
waiting in their next collective for ever.  So each rank's watchdog thread sends
a heartbeat to the next rank every ``interval`` seconds and watches the previous
rank's; a rank silent for ``heartbeat_timeout`` seconds is named in an error and
the job is aborted (MPI_Abort, which makes the launcher end every rank).  The
thread also aborts when the main thread has waited ``collective_timeout`` seconds
in one collective.  The main thread waits in MPI with the GIL released, so the
thread runs whatever the main thread does.
"""
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

HEARTBEAT, GOODBYE = 1, 2   # message tags
POLL = 0.1                  # seconds between looks at the messages and the previous rank
# a collective still waited for this many seconds after the previous rank left never completes
LEFT_GRACE = 5.0
# the exit status of a rank that ends the job because another rank failed
FAILURE_EXIT_CODE = 75


class Watchdog:
    """Heartbeats to rank + 1, watching rank - 1 (modulo size), over ``comm`` (a
    communicator of its own).  ``places[r]``: rank r's (pid, host name); a previous
    rank on this machine is also watched by its pid, so that its end is noticed at
    once.  ``abort()`` ends the job."""

    def __init__(self, comm, places, heartbeat_timeout, collective_timeout, abort,
                 interval=1.0):
        self.comm, self.places, self.abort = comm, places, abort
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.heartbeat_timeout, self.collective_timeout = heartbeat_timeout, collective_timeout
        self.interval = min(interval, heartbeat_timeout / 4)
        self._stopping = threading.Event()
        self._waiting = None    # (what, since): the collective the main thread waits in
        self._thread = None

    def start(self):
        if self.size > 1:
            self._thread = threading.Thread(target=self._run, name="cyconv-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self):
        """Say goodbye to the next rank (it stops watching this one) and end the thread."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(timeout=10)
            self._thread = None

    @contextmanager
    def blocking(self, what):
        """The main thread waits in the collective ``what`` inside this block."""
        self._waiting = (what, time.monotonic())
        try:
            yield
        finally:
            self._waiting = None

    def describe(self, rank):
        pid, host = self.places[rank]
        return f"rank {rank} (pid {pid} on {host})"

    def _gone(self, rank):
        """True when ``rank`` ran on this machine and its process has ended."""
        pid, host = self.places[rank]
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def _run(self):
        from mpi4py import MPI
        after, before = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        token, inbox, status = np.zeros(1, np.uint8), np.zeros(1, np.uint8), MPI.Status()
        sends, heard, left = [], time.monotonic(), None
        next_beat = heard
        receive = self.comm.Irecv(inbox, source=before, tag=MPI.ANY_TAG)
        try:
            while not self._stopping.wait(POLL):
                if time.monotonic() >= next_beat:
                    sends = [request for request in sends if not request.Test()]
                    sends.append(self.comm.Isend(token, dest=after, tag=HEARTBEAT))
                    next_beat += self.interval
                while receive is not None and receive.Test(status):
                    heard = time.monotonic()
                    if status.Get_tag() == GOODBYE:
                        receive, left = None, heard
                    else:
                        receive = self.comm.Irecv(inbox, source=before, tag=MPI.ANY_TAG)
                self._check(before, heard, left)
            self.comm.Isend(token, dest=after, tag=GOODBYE).Wait()
            if receive is not None:
                receive.Cancel()
                receive.Wait()
        except MPI.Exception as error:
            self._fail(f"MPI failed between {self.describe(before)} and {self.describe(after)} "
                       f"({error.Get_error_string()})")

    def _check(self, before, heard, left):
        """Fail when the previous rank (``heard``: its last message; ``left``: when it said
        goodbye, or None) died, hangs, or left while this rank waits in a collective."""
        now, waiting = time.monotonic(), self._waiting
        if left is None and self._gone(before):
            self._fail(f"{self.describe(before)} has ended before the run did")
        if left is None and now - heard > self.heartbeat_timeout:
            self._fail(f"{self.describe(before)} sent no heartbeat for {now - heard:.0f} s: "
                       "it died or hangs")
        if left is not None and waiting is not None and \
                now - max(left, waiting[1]) > LEFT_GRACE:
            self._fail(f"{self.describe(before)} has left the run (it ended, maybe with an "
                       f"error) while this rank waits in {waiting[0]}")
        if waiting is not None and now - waiting[1] > self.collective_timeout:
            self._fail(f"{waiting[0]} did not complete within {self.collective_timeout:g} s: "
                       "another rank is stuck or runs different code (every rank must make "
                       "the same collective calls in the same order)")

    def _fail(self, message):
        print(f"cyconv.distributed: {self.describe(self.rank)}: {message}; ending the job",
              file=sys.stderr, flush=True)
        self.abort()
        os._exit(FAILURE_EXIT_CODE)   # not reached: MPI_Abort ends the process
