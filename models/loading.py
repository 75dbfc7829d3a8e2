"""One model load at a time per process.

transformers and diffusers build models on the meta device by patching torch's global module
state for the duration of a load; two loads in two threads at once see each other's patches and
fail ("Cannot copy out of meta tensor"). Every lazy load takes this lock; running models does not.
"""

from __future__ import annotations

import threading

LOADING = threading.RLock()  # re-entrant: a loader may load its parts
