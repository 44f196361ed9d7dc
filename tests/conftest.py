"""Session-wide test setup.

Triton kernels run in Triton's interpreter on the CPU (there is no GPU here). The variable must be
set before anything imports ``triton`` — bitsandbytes and transformers do, from other test
modules — because ``triton.language``'s own jitted helpers are built at import time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# Hypothesis draws the same examples on every run (a failure is reproducible, a pass is not luck);
# each test's @settings also says derandomize=True, and this profile covers a test that forgets it.
settings.register_profile("derandomized", derandomize=True)
settings.load_profile("derandomized")
