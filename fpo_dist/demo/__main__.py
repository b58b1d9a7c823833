"""``python -m fpo_dist.demo``: the whole pipeline on the bundled task (see ``fpo_dist.demo.run``)."""

import sys

from fpo_dist.demo.run import main

sys.exit(main())
