import sys

from flowgrove.cli import main

sys.exit(main())
