"""SIGINT/SIGTERM during training: note the signal, let the loop save and stop."""
import signal
import threading


class SignalGuard:
    """Inside ``with SignalGuard() as guard:``, SIGINT and SIGTERM set ``guard.received``
    (the signal's name) instead of stopping the process, so that the loop can finish
    its step, save a checkpoint and return.  A second signal stops at once
    (KeyboardInterrupt; the files already written stay intact).  Outside the main
    thread, or with ``enabled=False``, it does nothing."""

    def __init__(self, enabled=True):
        self.enabled, self.received, self._previous = enabled, None, {}

    def _on_signal(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        self.received = None
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
