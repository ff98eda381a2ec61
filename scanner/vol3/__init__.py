"""volatility3 integration: a layer for every format vmleak reads and the ``vmleak.Scan``
plugin. Needs volatility3 (``pip install 'vmleak[vol3]'``); ``vmleak vol3-path`` prints the
plugin directory to give ``vol`` with ``-p``."""

from pathlib import Path

#: the directory holding the plugin module, for ``vol -p``
PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"
