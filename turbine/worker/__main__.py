"""`python -m turbine.worker`."""

import sys

from turbine.worker.main import main

sys.exit(main(prog="python -m turbine.worker"))
