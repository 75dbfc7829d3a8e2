"""A process that generated and exits at once stops the decode loop's thread first: a thread still
inside torch when the interpreter tears it down can abort the process ("terminate called without
an active exception", exit code 134)."""

import subprocess
import sys

# registered before the scheduler's own exit hook, so it runs after it (atexit runs last-in first-out)
SCRIPT = """
import atexit, os, threading

def check():
    if any(t.name == "signalgraph-decode" and t.is_alive() for t in threading.enumerate()):
        os._exit(3)

atexit.register(check)
from models.mmllm import MMLLM
from models.profiles import load_profile
mm = MMLLM.from_profile(load_profile("tiny"))
mm.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)
"""


def test_the_decode_thread_is_stopped_before_the_interpreter_exits():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
