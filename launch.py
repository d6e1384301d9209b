"""Open the wanda_gui app at http://127.0.0.1:7860 (options: --host, --port, --share, --auth user:pass)."""

import sys

from wanda_gui.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
