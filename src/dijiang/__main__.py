import sys

from dijiang.cli import main

sys.exit(main())
