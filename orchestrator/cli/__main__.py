"""``python -m orchestrator.cli`` is the ``metaray`` command (for a Ray job's entrypoint, where the console script may
not be installed)."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
