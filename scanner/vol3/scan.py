"""What the ``vmleak.Scan`` volatility3 plugin (``plugins/vmleak.py``) does: vmleak's detectors
over the physical layer of whatever image volatility3 opened, and Linux process attribution.

The physical layer is the :class:`~scanner.vol3.layer.VmleakLayer` for images vmleak parses
(then the scan is exactly ``vmleak scan``'s, seams stitched), or any other volatility3 physical
layer (Windows crash dumps, hibernation files ...), read in 16 MiB windows of its mapped ranges.
Output: a TreeGrid (detector, physical address, masked value, fingerprint, confidence, details;
with ``--attribute`` also PID, process and virtual address, one row per process mapping the
finding's page), so ``-r json`` / ``-r csv`` work. Values stay masked unless ``--unmask``.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from volatility3.framework import exceptions, interfaces

from parsers import registry
from parsers.base import Extents, MemoryImage, Segment
from patterns.registry import select
from scanner.engine import Engine, ScanConfig
from scanner.findings import Finding, load_key
from scanner.vol3.layer import VmleakLayer, local_path

vollog = logging.getLogger(__name__)

WINDOW = 16 << 20  # bytes of a foreign physical layer read per segment
MIN_CONFIDENCE = 0.3  # as ``vmleak scan``'s default
USER_TOP_64 = 1 << 47  # x86-64 Linux: user space is the lower canonical half
USER_TOP_32 = 0xC0000000  # i386 Linux: the default 3G/1G split (PAGE_OFFSET)


def layer_image(layer: interfaces.layers.DataLayerInterface) -> MemoryImage:
    """A streamed MemoryImage of a volatility3 physical layer: its mapped ranges (a
    translation layer's ``mapping``; the whole address range of a plain data layer) in
    windows of WINDOW bytes, unreadable bytes as zeros."""
    if isinstance(layer, interfaces.layers.TranslationLayerInterface):
        ranges: list[list[int]] = []
        for off, size, *_ in layer.mapping(
            layer.minimum_address, layer.maximum_address - layer.minimum_address + 1,
            ignore_errors=True,
        ):
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1][1] += size
            else:
                ranges.append([off, size])
    else:
        ranges = [[layer.minimum_address, layer.maximum_address - layer.minimum_address + 1]]

    def stream() -> Iterator[Segment]:
        buf = np.zeros(WINDOW, np.uint8)
        for start, length in ranges:
            for a in range(start, start + length, WINDOW):
                n = min(WINDOW, start + length - a)
                buf[:n] = np.frombuffer(layer.read(a, n, pad=True), np.uint8)
                yield Segment(buf[:n], Extents.single(n, addr=a), layer.name, reused=True)

    return MemoryImage(path=layer.name, format=f"volatility3 {type(layer).__name__}",
                       stream=stream)


def scan_layer(
    context: interfaces.context.ContextInterface,
    layer: interfaces.layers.DataLayerInterface,
    detectors: str,
    unmask: bool,
) -> list[Finding]:
    """vmleak's findings in a physical layer (ValueError for an unknown detector name)."""
    config = ScanConfig(select(detectors), load_key(None), unmask, min_confidence=MIN_CONFIDENCE)
    if isinstance(layer, VmleakLayer):  # exactly vmleak scan's reading, seams stitched
        image = registry.open_image(local_path(context.layers[layer.dependencies[0]]))
    else:
        image = layer_image(layer)
    with image:
        result = Engine(config).scan_image(image)
    for err in result.errors:
        vollog.warning(f"vmleak: {err}")
    return result.findings


def linux_kernel(context: interfaces.context.ContextInterface, layer_name: str) -> str | None:
    """The name of a Linux kernel module over the layer ``layer_name`` (an Intel layer that
    volatility3's Linux stacker built, which it does only when an ISF in its symbol
    directories matches the kernel's banner), or None. It is built the way volatility3's
    automagic builds a plugin's ``kernel`` requirement (LinuxSymbolFinder, then KernelModule),
    under a configuration path of our own: the plugin asks for a plain layer, so that it runs
    on images with no symbols too."""
    from volatility3.framework import layers
    from volatility3.framework.automagic.linux import LinuxSymbolFinder
    from volatility3.framework.automagic.module import KernelModule
    from volatility3.framework.configuration import requirements

    layer = context.layers[layer_name]
    if not isinstance(layer, layers.intel.Intel):
        return None
    join = interfaces.configuration.path_join
    req = requirements.ModuleRequirement(name="kernel", architectures=["Intel32", "Intel64"])
    base = "vmleak_attribution"
    at = join(base, "kernel", "layer_name")
    context.config.merge(at, layer.build_configuration())
    context.config[at] = layer_name
    LinuxSymbolFinder(context, join("automagic", "LinuxSymbolFinder"))(context, base, req)
    KernelModule(context, join("automagic", "KernelModule"))(context, base, req)
    name = context.config.get(join(base, "kernel"))
    return name if isinstance(name, str) and name in context.modules else None


@dataclass
class Mapping:
    """A process's mapping of physical bytes ``[phys, phys + size)`` at virtual ``virt``."""

    phys: int
    size: int
    virt: int
    pid: int
    name: str


class Attribution:
    """Which processes map which physical pages (Linux: every task's page tables)."""

    def __init__(self, maps: list[Mapping]) -> None:
        self.maps = sorted(maps, key=lambda m: m.phys)
        self.starts = [m.phys for m in self.maps]
        self.widest = max((m.size for m in self.maps), default=0)

    @classmethod
    def linux(cls, context: interfaces.context.ContextInterface, kernel: str,
              physical: str) -> Attribution:
        from volatility3.framework.objects import utility
        from volatility3.plugins.linux import pslist

        maps = []
        for task in pslist.PsList.list_tasks(context, kernel):
            try:
                name = context.layers[task.add_process_layer() or ""]
            except (KeyError, exceptions.InvalidAddressException):
                continue  # kernel threads have no address space of their own
            pid, comm = int(task.pid), utility.array_to_string(task.comm)
            # user space only: every task's tables also map the kernel (its direct map)
            top = USER_TOP_64 if name.bits_per_register == 64 else USER_TOP_32
            for virt, size, phys, _, lname in name.mapping(0, top, ignore_errors=True):
                if lname == physical:
                    maps.append(Mapping(phys, size, virt, pid, comm))
        return cls(maps)

    def of(self, phys: int) -> list[Mapping]:
        """The mappings holding physical byte ``phys``, by PID then virtual address."""
        lo = bisect.bisect_left(self.starts, phys - self.widest + 1)
        hi = bisect.bisect_right(self.starts, phys)
        found = [m for m in self.maps[lo:hi] if m.phys <= phys < m.phys + m.size]
        return sorted(found, key=lambda m: (m.pid, m.virt))
