import sys

from edgeinferd.cli import main

sys.exit(main())
