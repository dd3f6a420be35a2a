"""`python -m pipeline` is the `transferline` command."""

import sys

from pipeline.cli import main

sys.exit(main())
