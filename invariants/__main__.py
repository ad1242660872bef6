import sys

from invariants._cli import main

sys.exit(main())
