"""`python -m server [serve] [flags]`: same as the `graphserve` command."""

import sys

from server.cli import main

if __name__ == "__main__":
    sys.exit(main())
