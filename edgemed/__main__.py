import sys

from edgemed.cli import main

sys.exit(main())
