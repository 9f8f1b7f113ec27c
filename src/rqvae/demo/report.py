"""The demo's report: ``report.json`` (every number and the configuration) and ``report.html`` (figures and
tables)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def html_report(out: Path, results: dict[str, Any]) -> Path:
    def img(name: str, caption: str) -> str:
        if not (out / name).is_file():
            return ""
        return (f'<figure><img src="{html.escape(name)}" style="image-rendering:pixelated;max-width:100%">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(fmt(v))}</td></tr>"
                   for k, v in results["metrics"].items())
    depth_rows = "".join(
        f"<tr><td>{d}</td><td>{fmt(p)}</td></tr>" for d, p in results.get("psnr_per_depth", {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rqvae demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} td,th{{padding:2px 10px}}
table{{border-collapse:collapse}} tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>rqvae demo: RQ-VAE + RQ-Transformer on {html.escape(results['data'])}</h1>
<p>Written by <code>rqvae demo</code> ({html.escape(results['finished'])}); configuration in
<code>report.json</code>.</p>
<h2>Metrics</h2><table>{rows}</table>
<h2>Class-conditional samples</h2>
<p>One row per class (top to bottom: {html.escape(', '.join(results['class_names']))}).</p>
{img('samples_per_class.png', 'samples from the RQ-Transformer, one row per class')}
<h2>Coarse-to-fine reconstructions (paper Figure 5)</h2>
<p>Top row: test images; row d+1: decoded from the first d codes of each 8x8 position.</p>
{img('coarse_to_fine.png', 'coarse-to-fine')}
<table><tr><th>depth d</th><th>test PSNR (dB)</th></tr>{depth_rows}</table>
<h2>Loss curves</h2>{img('loss_curves.png', 'training losses')}
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Write ``report.json`` and ``report.html``; returns the HTML file."""
    (out / "report.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return html_report(out, results)
