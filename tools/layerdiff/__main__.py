"""python -m tools.layerdiff: the layer-by-layer gradient debugger (see tools/layerdiff/__init__.py)."""
import sys

from .cli import main

sys.exit(main())
