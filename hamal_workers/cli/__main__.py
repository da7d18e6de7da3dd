import sys

from hamal_workers.cli import main

sys.exit(main())
