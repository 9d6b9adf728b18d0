"""`python -m recsys_cli ...` = `recsys ...`."""

import sys

from recsys_cli.main import main

sys.exit(main())
