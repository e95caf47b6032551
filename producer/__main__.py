"""``python -m producer`` is the ``cellos-producer`` command."""

import sys

from producer.cli import main

sys.exit(main())
