"""``python -m central run --config central.toml``: the same as ``wardpost receiver run``."""

import sys

from central.cli import main

sys.exit(main())
