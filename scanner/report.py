"""Evidence reports for a PCI assessor: ``report.json`` (everything, machine-readable) and a
self-contained ``report.html`` (inline CSS and SVG only; a Content-Security-Policy forbids
loading anything), both written 0600.

The report proves where cardholder data was found or not, and ties each finding to the exact
input bytes: the file holding it, the byte offset in that file, and the file's SHA-256 and
size (hashed when the report is made, streaming in ``HASH_BLOCK`` reads, after the scan;
``modified_since_scan_start`` says if the file's mtime is later than the scan's start, i.e.
the hash may not be of the bytes scanned). It cannot itself leak what it reports: findings
are masked (PAN at most first six / last four digits) and identified by keyed HMAC-SHA256
fingerprints; full values appear only when the run was given ``--unmask`` (and the report
says so at the top).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import platform
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from patterns.registry import DETECTORS
from scanner import __version__, dormant
from scanner.baseline import write_private
from scanner.findings import Finding
from scanner.imageinfo import coverage_text
from scanner.state import key_check

if TYPE_CHECKING:
    from scanner.outcome import Outcome

NAMES = ("report.json", "report.html")
HASH_BLOCK = 1 << 20  # bytes per read while hashing (memory stays bounded)
RANGES_KEPT = 256  # GPA ranges listed per image in report.json (count always given)
HTML_FINDINGS = 500  # findings listed per image in the HTML (all are in report.json)
STRIP_W, STRIP_H = 760, 34  # GPA strip size, px

# What each finding type bears on. PCI DSS v3.2.1 numbers first (as assessors still quote
# them), then v4.0.
PCI: dict[str, tuple[str, str]] = {
    "track": (
        "Sensitive authentication data after authorization",
        "v3.2.1 3.2 / 3.2.1 (do not store the full contents of any track after "
        "authorization); v4.0 3.3.1 / 3.3.1.1",
    ),
    "pan": (
        "Primary account number stored in clear",
        "v3.2.1 3.4 (render PAN unreadable anywhere it is stored) and 3.3 (mask PAN when "
        "displayed: at most first six / last four); v4.0 3.5.1 and 3.4.1",
    ),
    "key": (
        "Cryptographic key material in memory images",
        "v3.2.1 3.5 / 3.5.3 (store secret and private keys securely); v4.0 3.6.1 / 3.6.1.2 "
        "(where the keys protect account data)",
    ),
    "token": (
        "Authentication secrets (API keys, tokens) stored readable",
        "v4.0 8.3.2 (authentication factors unreadable in storage) and 8.6.2 (no hard-coded "
        "application/system account secrets)",
    ),
    "pii": (
        "Personal data (not cardholder data)",
        "outside PCI DSS scope; privacy law and data-retention policy apply",
    ),
}
KIND = {
    "pan": "pan",
    "track1": "track",
    "track2": "track",
    "ssn": "pii",
    "aes-key": "key",
    "rsa-key": "key",
    "ec-key": "key",
    "pem-key": "key",
    "ssh-key": "key",
}
COLOURS = {
    "track": "#8b0000",
    "pan": "#d62728",
    "key": "#7b3fa0",
    "token": "#1f5fbf",
    "pii": "#e07b00",
}
FINGERPRINT_NOTE = (
    "Fingerprints are keyed cryptographic hashes (HMAC-SHA256) of the entire normalized value, "
    "as PCI DSS v4.0 3.5.1.1 requires of hashes of PAN; the key is kept outside this report "
    "(its check value is given so the same key can be shown to have made them)."
)


def kind(detector: str) -> str:
    """The PCI category of a detector (``token`` for the secret-token detectors)."""
    return KIND.get(detector, "token")


def sha256_file(path: str) -> dict[str, Any]:
    """SHA-256 and size (bytes) of a file, read in ``HASH_BLOCK`` pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            h.update(block)
            size += len(block)
    st = os.stat(path)
    return {"path": path, "size": size, "sha256": h.hexdigest(), "mtime_ns": st.st_mtime_ns}


def _finding_dict(f: Finding, reason: str | None, new: bool | None) -> dict[str, Any]:
    d = f.to_dict()
    d["pci"] = kind(f.detector)
    d["accepted"] = reason
    if new is not None:
        d["new"] = new
    return d


def build(out: Outcome, argv: list[str], status: int) -> dict[str, Any]:
    """The report document (see module docstring) of a run's outcome, the command line
    that started it and its exit status."""
    summary = out.summary
    all_files = sorted({f for r in summary.results for f in summary.files.get(r.image, [r.image])})
    jobs = max(1, min(8, os.cpu_count() or 1))

    def one(path: str) -> tuple[str, dict[str, Any]]:
        try:
            return path, sha256_file(path)
        except OSError as exc:
            return path, {"path": path, "error": exc.strerror or str(exc)}

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # hashlib releases the GIL
        hashes = dict(pool.map(one, all_files))
    started_ns = out.started_ns
    new_keys = None
    if out.changes is not None:
        new_keys = {(c.image, c.detector, c.fingerprint) for c in out.changes if c.kind == "new"}
    images = []
    for r in summary.results:
        files = []
        for p in summary.files.get(r.image, [r.image]):
            h = dict(hashes.get(p, {"path": p, "error": "not hashed"}))
            if "mtime_ns" in h:
                h["modified_since_scan_start"] = h.pop("mtime_ns") > started_ns
            files.append(h)
        cov = summary.coverage.get(r.image) if r.format else None
        findings = [
            _finding_dict(
                f,
                out.reason(f),
                None if new_keys is None else (f.image, f.detector, f.fingerprint) in new_keys,
            )
            for f in r.findings
        ]
        images.append(
            {
                "image": r.image,
                "format": r.format,
                "files": files,
                "meta": r.meta,
                "bytes_scanned": r.bytes_scanned,  # guest memory and file regions
                "region_bytes": r.region_bytes,  # of those, file regions outside guest memory
                "rescanned_this_run": r.image in out.scanned,
                "gpa_ranges": None if cov is None else [list(x) for x in cov[:RANGES_KEPT]],
                "gpa_range_count": None if cov is None else len(cov),
                "errors": r.errors,
                "warnings": r.warnings,
                "findings": findings,
            }
        )
    all_f = [f for i in images for f in i["findings"]]
    counts = Counter(f["detector"] for f in all_f if not f["accepted"])
    changes = out.changes or []
    return {
        "vmleak_report": 1,
        "tool": {"name": "vmleak", "version": __version__},
        "command_line": list(argv),
        "started": out.started,
        "ended": out.ended,
        "host": {
            "name": socket.gethostname(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "unmasked": bool(out.config.unmask),
        "fingerprints": {
            "algorithm": "HMAC-SHA256(key, detector ':' normalized value)",
            "key_check": key_check(out.key),
            "note": FINGERPRINT_NOTE,
        },
        "detectors": [
            {"name": d.name, "version": d.version, "group": d.group} for d in out.config.detectors
        ],
        "min_confidence": out.config.min_confidence,
        "state": None
        if out.state_path is None
        else {"database": out.state_path, "run": out.run_id},
        "exit_status": status,
        "summary": {
            "images": len(images),
            "images_with_findings": sum(
                1 for i in images if any(not f["accepted"] for f in i["findings"])
            ),
            "findings": sum(counts.values()),
            "findings_by_detector": dict(sorted(counts.items())),
            "accepted": sum(1 for f in all_f if f["accepted"]),
            "new": None
            if out.changes is None
            else sum(1 for f in all_f if f.get("new") and not f["accepted"]),
            "resolved": None if out.changes is None else sum(c.kind == "resolved" for c in changes),
            "images_with_errors": sum(1 for i in images if i["errors"]) + len(summary.errors),
            "bytes_scanned": sum(i["bytes_scanned"] for i in images),
            "region_bytes": sum(i["region_bytes"] for i in images),
            "skipped": dict(summary.skips),
        },
        "pci_requirements": {
            k: {
                "what": v[0],
                "requirements": v[1],
                "detectors": sorted({d.name for d in DETECTORS if kind(d.name) == k}),
            }
            for k, v in PCI.items()
        },
        "images": images,
        "dormant_images": dormant.dormant(summary.results),
        "resolved": [c.to_dict() for c in changes if c.kind == "resolved"],
        "input_errors": summary.errors,
        "unreadable": summary.unreadable,
    }


def write(out_dir: str, doc: dict[str, Any]) -> None:
    """Write report.json and report.html into ``out_dir`` (created 0700), each 0600."""
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    write_private(os.path.join(out_dir, NAMES[0]), json.dumps(doc, indent=1, default=str) + "\n")
    write_private(os.path.join(out_dir, NAMES[1]), render_html(doc))


# ------------------------------------------------------------------------------ HTML

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top} th{background:#f2f2f2} td.n{text-align:right}
code,.mono{font-family:ui-monospace,monospace;font-size:12.5px;word-break:break-all}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em 1em}
.bad{color:#b00020;font-weight:bold} .ok{color:#1b7a1b;font-weight:bold}
.key span{display:inline-block;margin-right:1.2em} .sw{width:.9em;height:.9em;
display:inline-block;vertical-align:middle;margin-right:.3em}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _hex(v: int | None) -> str:
    return "-" if v is None else f"{v:#x}"


def render_html(doc: dict[str, Any]) -> str:
    """The self-contained HTML page of a report document."""
    s = doc["summary"]
    out: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>vmleak evidence report {_e(doc['started'])}</title><style>{CSS}</style>",
        "</head><body>",
        "<h1>vmleak evidence report</h1>",
        f"<p>vmleak {_e(doc['tool']['version'])} on {_e(doc['host']['name'])} "
        f"({_e(doc['host']['platform'])}); scan {_e(doc['started'])} to {_e(doc['ended'])} "
        f"(UTC); exit status <b id='exit-status'>{doc['exit_status']}</b>.</p>",
        f"<p>Command line: <code>{_e(' '.join(doc['command_line']))}</code></p>",
    ]
    if doc["unmasked"]:
        out.append(
            "<p class='warn'><b>This report was made with --unmask: it contains full secret "
            "values. Handle it as cardholder data.</b></p>"
        )
    verdict = (
        "<span class='bad'>cardholder or secret data found</span>"
        if s["findings"]
        else "<span class='ok'>no unaccepted findings</span>"
    )
    rows = [
        ("Images examined", "images", s["images"]),
        ("Images with findings", "images-with-findings", s["images_with_findings"]),
        ("Findings (not accepted)", "total-findings", s["findings"]),
        ("Accepted (baseline/allowlist)", "accepted", s["accepted"]),
        ("New since the last run", "new", "-" if s["new"] is None else s["new"]),
        (
            "Resolved since the last run",
            "resolved",
            "-" if s["resolved"] is None else s["resolved"],
        ),
        ("Inputs with errors", "errors", s["images_with_errors"]),
        ("Guest memory scanned (bytes)", "bytes", f"{s['bytes_scanned'] - s['region_bytes']:,}"),
        ("File regions outside guest memory scanned (bytes)", "region-bytes",
         f"{s['region_bytes']:,}"),
    ]
    out.append(f"<h2>Summary</h2><p>Result: {verdict}.</p><table>")
    out += [f"<tr><th>{a}</th><td class='n' id='{b}'>{_e(c)}</td></tr>" for a, b, c in rows]
    out.append("</table>")
    if s["skipped"]:
        out.append(
            "<p>Passed over in directories: "
            + _e(", ".join(f"{n} {why}" for why, n in sorted(s["skipped"].items())))
            + ".</p>"
        )
    out += dormant.html(doc.get("dormant_images") or [], _e)
    out += _detector_table(doc)
    out += _pci_table(doc)
    out.append(
        f"<h2>Fingerprints</h2><p>{_e(doc['fingerprints']['note'])} Key check value: "
        f"<code id='key-check'>{_e(doc['fingerprints']['key_check'])}</code>.</p>"
    )
    out.append(
        "<p>Detectors: "
        + _e(", ".join(f"{d['name']} v{d['version']}" for d in doc["detectors"]))
        + f"; minimum confidence {doc['min_confidence']}.</p>"
    )
    out.append("<h2>Images</h2>")
    out.append(_legend())
    for n, img in enumerate(doc["images"]):
        out += _image_section(n, img)
    if doc["resolved"]:
        out.append(
            "<h2>Resolved since the last run</h2><table><tr><th>Image</th><th>Detector</th>"
            "<th>GPA</th><th>Masked</th><th>Fingerprint</th></tr>"
        )
        out += [
            f"<tr><td class='mono'>{_e(c['image'])}</td><td>{_e(c['detector'])}</td>"
            f"<td class='mono'>{_hex(c['gpa'])}</td><td class='mono'>{_e(c['masked'])}</td>"
            f"<td class='mono'>{_e(c['fingerprint'])}</td></tr>"
            for c in doc["resolved"]
        ]
        out.append("</table>")
    problems = doc["input_errors"] + [f"unreadable: {u}" for u in doc["unreadable"]]
    if problems:
        out.append("<h2>Inputs not examined</h2><ul>")
        out += [f"<li class='mono'>{_e(p)}</li>" for p in problems]
        out.append("</ul>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _detector_table(doc: dict[str, Any]) -> list[str]:
    dets = sorted({f["detector"] for i in doc["images"] for f in i["findings"]})
    out = [
        "<h2>Findings per image and detector</h2><table id='per-image'><tr><th>Image</th>"
        "<th>Format</th><th>Size (bytes)</th><th>SHA-256</th>"
        + "".join(f"<th>{_e(d)}</th>" for d in dets)
        + "<th>Total</th><th>Accepted</th></tr>"
    ]
    for n, img in enumerate(doc["images"]):
        c = Counter(f["detector"] for f in img["findings"] if not f["accepted"])
        acc = sum(1 for f in img["findings"] if f["accepted"])
        first = img["files"][0] if img["files"] else {}
        out.append(
            f"<tr><td class='mono'><a href='#img{n}'>{_e(img['image'])}</a></td>"
            f"<td>{_e(img['format'] or 'unreadable')}</td>"
            f"<td class='n'>{_e(first.get('size', '-'))}</td>"
            f"<td class='mono'>{_e(first.get('sha256', first.get('error', '-')))}</td>"
            + "".join(f"<td class='n'>{c.get(d, 0)}</td>" for d in dets)
            + f"<td class='n' id='img{n}-total'>{sum(c.values())}</td><td class='n'>{acc}</td></tr>"
        )
    out.append("</table>")
    return out


def _pci_table(doc: dict[str, Any]) -> list[str]:
    by_kind = Counter(f["pci"] for i in doc["images"] for f in i["findings"] if not f["accepted"])
    out = [
        "<h2>PCI DSS requirements concerned</h2><table id='pci'><tr><th>Finding type</th>"
        "<th>Detectors</th><th>Requirements</th><th>Findings</th></tr>"
    ]
    for k, v in doc["pci_requirements"].items():
        out.append(
            f"<tr><td><span class='sw' style='background:{COLOURS[k]}'></span>{_e(v['what'])}</td>"
            f"<td>{_e(', '.join(v['detectors']))}</td><td>{_e(v['requirements'])}</td>"
            f"<td class='n' id='pci-{k}'>{by_kind.get(k, 0)}</td></tr>"
        )
    out.append("</table>")
    return out


def _legend() -> str:
    items = "".join(
        f"<span><span class='sw' style='background:{c}'></span>{_e(PCI[k][0])}</span>"
        for k, c in COLOURS.items()
    )
    return (
        f"<p class='key'>{items}<span><span class='sw' style='background:#999'></span>"
        "accepted</span><span><span class='sw' style='background:#cfe3cf'></span>guest memory "
        "present in the image</span></p>"
    )


def strip_svg(img: dict[str, Any]) -> str:
    """An SVG strip of the image's guest-physical address space: the ranges it holds and a
    tick per pixel column and finding type where findings lie (count in the tooltip)."""
    ranges = img["gpa_ranges"] or []
    located = [f for f in img["findings"] if f["gpa"] is not None]
    top = max(
        [b for _, b in ranges]
        + [f["gpa"] + f["length"] for f in located]
        + [int(img["meta"].get("ram_size") or 0) if isinstance(img["meta"], dict) else 0]
        + [1]
    )
    scale = STRIP_W / top
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{STRIP_W + 2}' height='{STRIP_H + 16}' "
        f"role='img' aria-label='guest-physical address space, {len(located)} findings'>",
        f"<rect x='1' y='1' width='{STRIP_W}' height='{STRIP_H}' fill='#f4f4f4' stroke='#888'/>",
    ]
    spans: list[list[int]] = []
    for a, b in ranges:  # merged at pixel resolution, so the SVG stays small
        x0, x1 = int(a * scale), max(int(a * scale) + 1, int(b * scale))
        if spans and x0 <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], x1)
        else:
            spans.append([x0, x1])
    parts += [
        f"<rect x='{1 + x0}' y='1' width='{x1 - x0}' height='{STRIP_H}' fill='#cfe3cf'/>"
        for x0, x1 in spans
    ]
    ticks: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for f in located:
        k = "accepted" if f["accepted"] else f["pci"]
        ticks.setdefault((int(f["gpa"] * scale), k), []).append(f)
    for (x, k), fs in sorted(ticks.items()):
        colour = "#999" if k == "accepted" else COLOURS[k]
        lo, hi = min(f["gpa"] for f in fs), max(f["gpa"] for f in fs)
        what = ", ".join(f"{n} {d}" for d, n in sorted(Counter(f["detector"] for f in fs).items()))
        parts.append(
            f"<rect x='{1 + min(x, STRIP_W - 2)}' y='3' width='2' height='{STRIP_H - 4}' "
            f"fill='{colour}'><title>{_e(what)} at GPA {_hex(lo)}"
            f"{'' if lo == hi else '..' + _hex(hi)}</title></rect>"
        )
    parts.append(
        f"<text x='1' y='{STRIP_H + 13}' font-size='11'>0x0</text>"
        f"<text x='{STRIP_W}' y='{STRIP_H + 13}' font-size='11' "
        f"text-anchor='end'>{_hex(top)}</text>"
        "</svg>"
    )
    return "".join(parts)


def _image_section(n: int, img: dict[str, Any]) -> list[str]:
    fs = img["findings"]
    unplaced = [f for f in fs if f["gpa"] is None]
    earlier = "" if img["rescanned_this_run"] else " (unchanged: results of an earlier run)"
    ranges = "" if img["gpa_range_count"] is None else f", {img['gpa_range_count']} GPA range(s)"
    out = [
        f"<h3 id='img{n}' class='mono'>{_e(img['image'])}</h3>",
        f"<p>Format {_e(img['format'] or 'unreadable')}; "
        f"{img['bytes_scanned'] - img['region_bytes']:,} bytes of guest memory and "
        f"{img['region_bytes']:,} bytes of file regions outside it scanned{earlier}; "
        f"<b id='img{n}-findings'>{len(fs)}</b> finding(s){ranges}.</p>",
        strip_svg(img),
    ]
    if unplaced:
        out.append(
            f"<p>{len(unplaced)} finding(s) lie outside guest-physical memory "
            "(in a named block without a GPA; see the table).</p>"
        )
    out.append("<table><tr><th>File</th><th>Size (bytes)</th><th>SHA-256</th></tr>")
    for f in img["files"]:
        note = " (modified since the scan started)" if f.get("modified_since_scan_start") else ""
        out.append(
            f"<tr><td class='mono'>{_e(f['path'])}</td><td class='n'>{_e(f.get('size', '-'))}</td>"
            f"<td class='mono'>{_e(f.get('sha256', f.get('error')))}{note}</td></tr>"
        )
    out.append("</table>")
    meta = dict(img["meta"] or {})
    cov = meta.pop("coverage", None)
    if meta.pop("unrecognised", False):
        out.append("<p class='warn'>Scanned as raw memory only because no known format "
                   "recognised it: addresses are file offsets.</p>")
    if meta:
        out.append("<p>Guest: " + _e("; ".join(f"{k} = {v}" for k, v in meta.items())) + "</p>")
    if cov:
        out.append("<p>Memory: " + _e(coverage_text(cov)) + "</p>")
    for e in img["errors"]:
        out.append(f"<p class='warn'>Error: {_e(e)}</p>")
    for w in img["warnings"]:
        out.append(f"<p class='warn'>Note: {_e(w)}</p>")  # remarks; damage is in errors
    if fs:
        out.append(
            "<table><tr><th>Detector</th><th>GPA</th><th>File</th><th>Offset</th><th>Len</th>"
            "<th>Enc</th><th>Masked</th><th>Fingerprint</th><th>Status</th></tr>"
        )
        for f in fs[:HTML_FINDINGS]:
            status = (
                f"accepted: {f['accepted']}" if f["accepted"] else ("NEW" if f.get("new") else "")
            )
            where = (
                _hex(f["gpa"])
                if f["gpa"] is not None
                else f"{f['details'].get('block')}+{_hex(f['details'].get('block_offset'))}"
            )
            shown = f["details"].get("value", f["masked"])
            out.append(
                f"<tr><td>{_e(f['detector'])}</td><td class='mono'>{_e(where)}</td>"
                f"<td class='mono'>{_e(os.path.basename(f['file']))}</td>"
                f"<td class='mono'>{_hex(f['offset'])}</td><td class='n'>{f['length']}</td>"
                f"<td>{_e(f['encoding'])}</td><td class='mono'>{_e(shown)}</td>"
                f"<td class='mono'>{_e(f['fingerprint'])}</td><td>{_e(status)}</td></tr>"
            )
        out.append("</table>")
        if len(fs) > HTML_FINDINGS:
            out.append(f"<p>{len(fs) - HTML_FINDINGS} more finding(s) in report.json.</p>")
    return out
