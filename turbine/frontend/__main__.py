"""`python -m turbine.frontend`."""

import sys

from turbine.frontend.main import main

sys.exit(main(prog="python -m turbine.frontend"))
