"""Silencing warnings from threads without breaking other threads' warnings.

`warnings.catch_warnings` saves and restores process-wide state (the filter list and
`showwarning`). Two threads inside it at once interleave the saves and restores: the warning
one meant to hide can reach stderr, and one thread's "ignore" filter can stay installed for
the rest of the process. vitkit hides warnings in decoding threads (PIL's decompression-bomb
warning) and around exporters and quantizers (calibration can run while requests decode), so
every use goes through `ignoring`, which holds one lock (re-entrant: the two may nest).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

_LOCK = threading.RLock()


@contextlib.contextmanager
def ignoring(*categories: type[Warning]) -> Iterator[None]:
    """Ignore warnings of `categories` (all of them when none is given) inside the block, under
    the lock. Keep the block short where other threads wait on it."""
    with _LOCK, warnings.catch_warnings():
        for category in categories or (Warning,):
            warnings.simplefilter("ignore", category)
        yield
