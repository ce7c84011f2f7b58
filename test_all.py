"""
All of the project's tests: plain `test_*` functions.
    python test_all.py          # runs them all, ends on "N passed, M failed"
    python test_all.py quant    # only tests whose name contains "quant"
    python -m pytest test_all.py
"""
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


# ------------------------------------------------------------------------------------------------
# the runner

def _run(pattern=""):
    import traceback
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f) and pattern in n]
    passed = failed = 0
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"ok    {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL  {name} ({time.time() - t0:.1f}s)", flush=True)
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(1 if _run(sys.argv[1] if len(sys.argv) > 1 else "") else 0)
