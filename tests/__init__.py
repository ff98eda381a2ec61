"""vmleak's test suite (a package, so helper modules are imported as ``tests.X``)."""
