"""``python -m arrtune`` (and ``accelerate launch -m arrtune train ...``)."""

import sys

from arrtune.cli import main

sys.exit(main())
