"""``python -m knoxd``: the same as the ``knoxd`` command."""

import sys

from knoxd.cli import main

sys.exit(main())
