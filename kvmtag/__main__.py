"""python -m kvmtag: the daemon, kvmtagd."""

import sys

from kvmtag.daemon import main

sys.exit(main())
