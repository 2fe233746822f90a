"""``python -m knoxctl``."""

from knoxctl.cli import main

raise SystemExit(main())
