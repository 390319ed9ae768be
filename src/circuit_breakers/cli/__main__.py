"""`python -m circuit_breakers.cli`: the entry point accelerate relaunches."""

import sys

from .main import main

sys.exit(main())
