"""`python -m vllm_ext ...` is the `vllm-ext` command (for environments without its script)."""

import sys

from vllm_ext.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
