"""`python -m clients.kvmtag_vmm`: the same program as the kvmtag-vmm console script."""

import sys

from clients.kvmtag_vmm.cli import main

sys.exit(main())
