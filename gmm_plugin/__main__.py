"""`python -m gmm_plugin ...`: the same as the `gmm-plugin` command."""
import sys

from .cli import main

sys.exit(main())
