"""Self-contained HTML pages of the reports: ``report.html`` and ``compare.html``.

The page is made from the same Markdown the ``.md`` report holds (the subset
alphanet writes: headings, paragraphs, bullet lists, pipe tables, ``**bold**``)
and the PNG plots, embedded as ``data:`` URIs. It has no script and loads
nothing, so it opens from disk in any browser with no server and no network.
"""
from __future__ import annotations

import base64
import html
import os
import re

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.5em; border-bottom: 1px solid #ccc; padding-bottom: .3em; }
h1.warning { color: #a40000; }
h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
p.warning { background: #fff1f0; border-left: 4px solid #a40000; padding: .5em .8em; }
figure { display: inline-block; margin: .6em 1em .6em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #e4e4e4; }
figcaption { font-size: .85em; color: #555; }
"""


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text, quote=False))


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    rows = [_cells(line) for line in lines if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip())]
    head, body = rows[0], rows[1:]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
    return "\n".join(out + ["</tbody>", "</table>"])


def _kind(line: str) -> str:
    return "table" if line.lstrip().startswith("|") else ("list" if line.startswith("* ") else "p")


def markdown_body(text: str) -> str:
    """The HTML of alphanet's Markdown: headings, paragraphs, lists and tables."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip():
            index += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            content = line[level:].strip()
            warning = ' class="warning"' if level == 1 and "WORSE" in content else ""
            blocks.append(f"<h{level}{warning}>{_inline(content)}</h{level}>")
            index += 1
        else:
            start, kind = index, _kind(line)
            while index < len(lines) and lines[index].strip() and not lines[index].startswith("#") and (
                    _kind(lines[index]) == kind):
                index += 1
            chunk = lines[start:index]
            if kind == "table":
                blocks.append(_table(chunk))
            elif kind == "list":
                items = [_inline(item[2:]) for item in chunk]
                blocks.append("<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")
            else:
                words = " ".join(part.strip() for part in chunk)
                warning = ' class="warning"' if words.startswith("**Warning") else ""
                blocks.append(f"<p{warning}>{_inline(words)}</p>")
    return "\n".join(blocks)


def _figure(path: str) -> str:
    with open(path, "rb") as stream:
        data = base64.b64encode(stream.read()).decode("ascii")
    name = os.path.basename(path)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>")


def page(markdown_text: str, images: list[str], title: str) -> str:
    """One HTML document: the Markdown's content, then the PNG files ``images``, embedded."""
    figures = "\n".join(_figure(path) for path in images)
    if not markdown_text.startswith("# "):  # the page's heading, where the Markdown has none
        markdown_text = f"# {title}\n\n{markdown_text}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"{markdown_body(markdown_text)}\n" + (f"<h2>Plots</h2>\n<div>\n{figures}\n</div>\n" if images else "")
            + "</body>\n</html>\n")
