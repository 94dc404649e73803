"""Built-in handlers; each is registered in the ``muxsrv.handlers`` entry-point group."""
