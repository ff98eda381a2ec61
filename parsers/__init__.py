"""Image parsers: WHERE are the guest's bytes? Each format module turns file(s) into a
:class:`parsers.base.MemoryImage`; :mod:`parsers.registry` detects formats by content."""
