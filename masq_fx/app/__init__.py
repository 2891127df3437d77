"""The application around the library: the ``masq-fx`` command line, its model sources, run reports, bench and inspect."""
