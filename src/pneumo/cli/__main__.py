"""``python -m pneumo.cli``: the same commands as the ``pneumo`` script."""

import sys

from pneumo.cli import app

sys.exit(app())
