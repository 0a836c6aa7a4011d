"""``python -m doe_export.cli``: the ``doe`` command where it is not installed (the lent GPU machine)."""

import sys

from . import main

sys.exit(main())
