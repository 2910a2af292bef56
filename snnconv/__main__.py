"""`python -m snnconv ...` (and `torchrun --nproc_per_node=K -m snnconv ...`): the snnconv command."""

import sys

from snnconv.cli import main

sys.exit(main())
