"""``python -m npu_parallel`` is the ``npu-parallel`` command."""

import sys

from npu_parallel.tools.cli import main

sys.exit(main())
