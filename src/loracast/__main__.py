"""Run the command line as ``python -m loracast``, which ``accelerate launch -m loracast`` uses."""

import sys

from loracast.cli import main

sys.exit(main())
