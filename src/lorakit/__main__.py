"""`python -m lorakit ...` is the `lorakit` command (handy under torchrun: `torchrun -m lorakit train ...`)."""

import sys

from .cli.main import main

sys.exit(main())
