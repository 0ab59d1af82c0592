import sys

from tlkit.cli import main

sys.exit(main())
