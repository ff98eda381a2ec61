"""volatility3 plugin ``vmleak.Scan`` (this directory is what ``vmleak vol3-path`` prints, for
``vol -p``). Importing it also makes vmleak's layer stacker known to volatility3, so every
image format vmleak reads opens in volatility3 (scanner/vol3/layer.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from volatility3.framework import exceptions, interfaces, layers, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

from scanner.vol3.layer import VmleakLayer, VmleakStacker  # noqa: F401  (found by subclassing)
from scanner.vol3.scan import Attribution, linux_kernel, scan_layer

vollog = logging.getLogger(__name__)


def refused(message: str) -> exceptions.PluginRequirementException:
    """The exception to stop the plugin with; the message is logged as an error first
    (volatility3's command line shows only a generic text for this exception)."""
    vollog.error(f"vmleak.Scan: {message}")
    return exceptions.PluginRequirementException(message)


class Scan(interfaces.plugins.PluginInterface):
    """vmleak's secret detectors over the physical memory (values masked unless --unmask)."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.TranslationLayerRequirement(
                name="primary", description="Memory layer to scan"
            ),
            requirements.StringRequirement(
                name="detectors",
                description="Comma-separated detector names or groups (as vmleak scan)",
                default="all",
                optional=True,
            ),
            requirements.BooleanRequirement(
                name="unmask", description="Show full secret values", default=False,
                optional=True,
            ),
            requirements.BooleanRequirement(
                name="attribute",
                description="Processes mapping each finding's page (Linux; needs the kernel's "
                "symbols)",
                default=False,
                optional=True,
            ),
        ]

    def _physical(self) -> interfaces.layers.DataLayerInterface:
        layer = self.context.layers[self.config["primary"]]
        if isinstance(layer, layers.intel.Intel):
            layer = self.context.layers[layer.config["memory_layer"]]
        return layer

    def _findings(self, layer: interfaces.layers.DataLayerInterface) -> list:
        unmask = bool(self.config.get("unmask"))
        if unmask:
            vollog.warning("vmleak: --unmask given: full secret values are shown")
        try:
            return scan_layer(self.context, layer, self.config.get("detectors") or "all", unmask)
        except ValueError as err:
            raise refused(str(err)) from None

    def _attribution(self, physical: str) -> Attribution | None:
        if not self.config.get("attribute"):
            return None
        kernel = linux_kernel(self.context, self.config["primary"])
        if kernel is None:
            raise refused(
                "--attribute needs the guest's Linux kernel symbols (an ISF for exactly this "
                "kernel, in a directory given with --symbol-dirs); Windows guests are not "
                "supported"
            )
        return Attribution.linux(self.context, kernel, physical)

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        layer = self._physical()
        attribution = self._attribution(layer.name)
        for f in self._findings(layer):
            row = (
                f.detector,
                format_hints.Hex(f.gpa) if f.gpa is not None else renderers.NotApplicableValue(),
                f.masked,
                f.fingerprint,
                float(f.confidence),
                json.dumps(f.details, sort_keys=True),
            )
            if attribution is None:
                yield 0, row
                continue
            maps = attribution.of(f.gpa) if f.gpa is not None else []
            for m in maps:
                yield 0, (*row, m.pid, m.name, format_hints.Hex(m.virt + f.gpa - m.phys))
            if not maps:
                na = renderers.NotAvailableValue()
                yield 0, (*row, na, na, na)

    def run(self) -> renderers.TreeGrid:
        columns = [
            ("Detector", str),
            ("Physical address", format_hints.Hex),
            ("Masked", str),
            ("Fingerprint", str),
            ("Confidence", float),
            ("Details", str),
        ]
        if self.config.get("attribute"):
            columns += [("PID", int), ("Process", str), ("Virtual address", format_hints.Hex)]
        return renderers.TreeGrid(columns, self._generator())
