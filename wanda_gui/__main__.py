"""`python -m wanda_gui` = the `wanda-gui` command."""

import sys

from .cli import main

sys.exit(main())
