"""`python -m hf_fsad.cli ...`, as `torchrun` and `accelerate launch` start the command line."""

import sys

from hf_fsad.cli import main

sys.exit(main())
