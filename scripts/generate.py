"""Same as ``transformax-generate``: ``python scripts/generate.py RUN_OR_HF_DIR --prompt "def " ...``
(a transformax-train run folder, or a Hugging Face GPT-2/Llama folder on disk)."""

import sys

from transformax.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
