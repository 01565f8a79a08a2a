import sys

from keyval.cli import main

sys.exit(main())
