"""``python -m neoxja``: the ``neoxja`` command, for when the console script is not on PATH."""

import sys

from neoxja.cli import main

sys.exit(main())
