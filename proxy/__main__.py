"""``python -m proxy``: the same command line as ``incountry-proxy``."""

from proxy.cli import main

raise SystemExit(main())
