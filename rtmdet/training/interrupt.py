"""Interrupts that take effect at step boundaries, and the test hook that sends them.

`StopFlag` turns SIGINT/SIGTERM into a flag the training loop reads between steps: the step
in flight finishes whole (never a half-applied optimizer update saved), the loop saves a
checkpoint and raises `TrainingInterrupted`. A second Ctrl-C interrupts at once (the last
checkpoint on disk stays intact: writes are atomic).

Test hook: RTMDET_TEST_INTERRUPT="PHASE:N" sends SIGINT to this process the N-th time
(1-based) the loop enters PHASE (data, forward, backward, optimizer, eval, predictions).
"""
import os
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after an interrupt was handled: the checkpoint is saved, the message says how
    to continue."""


class StopFlag:
    def __init__(self):
        self.requested, self._old = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt   # second Ctrl-C: stop now
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        return False


_counts = {}


def test_hook(phase):
    """Send SIGINT to this process at the N-th entry into `phase` (RTMDET_TEST_INTERRUPT)."""
    spec = os.environ.get("RTMDET_TEST_INTERRUPT")
    if not spec:
        return
    _counts[phase] = _counts.get(phase, 0) + 1
    for item in spec.split(","):
        name, _, n = item.partition(":")
        if name == phase and _counts[phase] == int(n or 1):
            os.kill(os.getpid(), signal.SIGINT)
