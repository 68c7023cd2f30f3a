import sys

from upete.cli import main

sys.exit(main())
