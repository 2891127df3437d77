"""``python -m masq_fx`` runs the ``masq-fx`` command line."""

import sys

from masq_fx.app.cli import main

sys.exit(main())
