import sys

from fedsite.cli import main

sys.exit(main())
