"""Session-wide test setup.

Triton kernels run in Triton's interpreter on the CPU (there is no GPU here). The variable must be
set before anything imports ``triton`` — bitsandbytes and transformers do, from other test
modules — because ``triton.language``'s own jitted helpers are built at import time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
