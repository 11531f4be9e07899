"""``python -m statefun_mesh``: the ``statefun-mesh`` command."""

import sys

from .cli import main

sys.exit(main())
