"""``python -m janus_core``: see :mod:`janus_core.cli`."""

import sys

from .cli import main

sys.exit(main())
