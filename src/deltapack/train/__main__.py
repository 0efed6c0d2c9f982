"""``python -m deltapack.train``: what torchrun starts on every rank (the options of ``deltapack train``)."""

import sys

from deltapack.train import main

sys.exit(main())
