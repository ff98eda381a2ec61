"""A volatility3 layer for every image format vmleak reads, and the stacker that offers it.

With ``vol -p "$(vmleak vol3-path)"``, volatility3 imports the plugin module, which imports
this one; volatility3's LayerStacker then finds :class:`VmleakStacker` among the subclasses of
``StackerLayerInterface`` (nothing is registered by hand). On the file layer of the image the
user gave, the stacker asks vmleak's parser registry what the file is; when it is a format
vmleak reads (anything but flat raw memory, which volatility3 reads as it is), it stacks a
:class:`VmleakLayer` presenting guest-physical memory: byte k of the layer is GPA k, and
addresses the image does not store raise ``InvalidAddressException`` as in volatility3's own
layers. volatility3's OS stackers (Linux/Windows page tables) then stack on top of it.

It runs before volatility3's own stackers (``stack_order`` 5 < 10), so the formats both read
(ELF cores, LiME, raw QEMU streams, VMware) are read by vmleak; those only volatility3 reads
(Windows crash dumps, hibernation files ...) look like raw memory to vmleak and are left to it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import unquote, urlparse

from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import physical

from parsers import registry
from parsers.base import ImageError
from scanner.vol3.memory import GuestMemory

vollog = logging.getLogger(__name__)

#: formats left to volatility3: flat memory has nothing to translate
DECLINED = {"raw"}
_OPEN: dict[tuple[str, int, int], GuestMemory] = {}  # one parse per file per process
_LOCK = threading.Lock()


def local_path(layer: interfaces.layers.DataLayerInterface) -> str | None:
    """The local file behind a volatility3 FileLayer (its ``file://`` location), else None."""
    if not isinstance(layer, physical.FileLayer):
        return None
    url = urlparse(layer.location)
    return unquote(url.path) if url.scheme == "file" else None


def guest_memory(path: str) -> GuestMemory:
    """The parsed image at ``path``, opened once per process (the stacker and the layer that
    volatility3 rebuilds from the configuration share it)."""
    import os

    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    with _LOCK:
        mem = _OPEN.get(key)
        if mem is None:
            mem = _OPEN[key] = GuestMemory(path)
        return mem


class VmleakLayer(interfaces.layers.DataLayerInterface):
    """Guest-physical memory of an image vmleak parses, over the file layer holding it."""

    _version = (1, 0, 0)

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context, config_path, name, metadata)
        self._base_layer = self.config["base_layer"]
        path = local_path(context.layers[self._base_layer])
        if path is None:
            raise exceptions.LayerException(name, "vmleak reads only local files")
        try:
            self.memory = guest_memory(path)
        except ImageError as err:
            raise exceptions.LayerException(name, str(err)) from None
        if self.memory.snapshot:
            vollog.warning(f"vmleak: {path}: the newest of its snapshots, {self.memory.snapshot}")
        for warning in self.memory.image.warnings:
            vollog.warning(f"vmleak: {warning}")

    @property
    def maximum_address(self) -> int:
        return max(self.memory.maximum_address, 0)

    @property
    def minimum_address(self) -> int:
        return 0

    @property
    def dependencies(self) -> list[str]:
        return [self._base_layer]

    @property
    def metadata(self) -> dict[str, Any]:
        return {**super().metadata, "vmleak_format": self.memory.format}

    def is_valid(self, offset: int, length: int = 1) -> bool:
        return self.memory.stored(offset, length)

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        out = bytearray(length) if pad else None
        at = offset
        parts = []
        for a, data in self.memory.pieces(offset, length):
            if a != at and not pad:
                raise exceptions.InvalidAddressException(
                    self.name, at, f"{self.name}: guest-physical {at:#x} is not in the image"
                )
            if out is not None:
                out[a - offset : a - offset + len(data)] = data
            else:
                parts.append(data)
            at = a + len(data)
        if out is not None:
            return bytes(out)
        if at != offset + length:
            raise exceptions.InvalidAddressException(
                self.name, at, f"{self.name}: guest-physical {at:#x} is not in the image"
            )
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        raise exceptions.LayerException(self.name, "evidence is read-only")

    def _scan_iterator(self, scanner: Any, sections: Any) -> Any:
        """Chunks of the stored ranges only (the base class assumes no holes and would drop
        every chunk that touches one)."""
        step = scanner.chunk_size
        for start, length in sections:
            for a, n in self.memory.ranges(start, length):
                for c in range(a, a + n, step):
                    size = min(a + n - c, step + scanner.overlap)
                    yield [(self.name, c, size)], c + size

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [requirements.TranslationLayerRequirement(name="base_layer", optional=False)]


class VmleakStacker(interfaces.automagic.StackerLayerInterface):
    """Stacks a :class:`VmleakLayer` on a file layer holding an image vmleak reads."""

    stack_order = 5

    @classmethod
    def stack(
        cls,
        context: interfaces.context.ContextInterface,
        layer_name: str,
        progress_callback: constants.ProgressCallback = None,
    ) -> interfaces.layers.DataLayerInterface | None:
        path = local_path(context.layers[layer_name])
        if path is None:
            return None
        try:
            _, fmt = registry.detect(path)
        except ImageError:
            return None
        if fmt in DECLINED:
            return None
        new_name = context.layers.free_layer_name("VmleakLayer")
        context.config[interfaces.configuration.path_join(new_name, "base_layer")] = layer_name
        try:
            layer = VmleakLayer(context, new_name, new_name)
        except exceptions.LayerException as err:
            vollog.warning(f"vmleak: {err}")
            return None
        vollog.info(f"vmleak: {path} is {fmt}: guest-physical memory through vmleak")
        return layer
