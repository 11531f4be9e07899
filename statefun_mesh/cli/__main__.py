"""``python -m statefun_mesh.cli``: the ``statefun-mesh`` command (as ``python -m statefun_mesh``)."""

import sys

from . import main

sys.exit(main())
