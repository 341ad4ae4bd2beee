"""``python -m edgeinferd.compress RECIPE``."""

from edgeinferd.compress.cli import main

raise SystemExit(main())
