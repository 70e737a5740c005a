"""`python -m rtmdet ...`: see rtmdet.cli."""
import sys

from .cli import main

sys.exit(main())
