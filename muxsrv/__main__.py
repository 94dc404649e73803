"""``python -m muxsrv``: run the server."""

from .cli import main

raise SystemExit(main())
