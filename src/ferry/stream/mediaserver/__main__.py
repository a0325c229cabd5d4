"""``python3 -m ferry.stream.mediaserver`` (the zipapp has its own ``__main__``)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
