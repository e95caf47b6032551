"""``python -m producer`` is the ``cellos-producer`` command."""

import sys

from producer.ops.cli import main

sys.exit(main())
