import sys

from vroll.cli import main

sys.exit(main())
