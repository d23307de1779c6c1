"""scripts/build_corpus.py: cleaning, the shingle dedup rule, parts + manifest round trip (fast, no network)."""
import json
import lzma
import struct
import zlib
from pathlib import Path

import pytest

from script_loader import load_script

bc = load_script("scripts/build_corpus.py")

PROSE = (
    "The scheduler decides which task runs next on each processor. It keeps a queue of runnable tasks "
    "and picks the one that has waited longest relative to its weight, so that every task gets a fair "
    "share of the processor over time. "
)


def test_html_to_text_drops_markup_scripts_and_navigation():
    page = (
        "<html><head><title>t</title><style>p{color:red}</style></head><body>"
        "<div class='navheader'>Prev Next Home</div>"
        "<h1>Memory &amp; Paging</h1><p>The kernel maps <b>pages</b> lazily.</p>"
        "<script>var x = 1;</script><pre>  int  x;\n  y();</pre>"
        "<div class='footer'>Copyright</div></body></html>"
    )
    text = bc.html_to_text(page)
    assert "Memory & Paging" in text
    assert "The kernel maps pages lazily." in text
    assert "int x;" in text or "int  x;" in text
    for gone in ("color:red", "var x", "Prev Next", "Copyright", "<b>"):
        assert gone not in text


def test_rst_to_text_drops_directives_roles_and_adornments():
    rst = (
        "=========\nScheduling\n=========\n\n"
        ".. _sched-doc:\n\n"
        "The :c:func:`schedule` function is described in :ref:`the overview <sched-overview>`.\n"
        "Use ``nice`` to change **priority**.\n\n"
        ".. code-block:: c\n\n   int main(void);\n\n"
        ".. note::\n\n   Real-time tasks are special.\n\n"
        "See `LWN <https://lwn.net>`_ too.\n"
    )
    text = bc.rst_to_text(rst)
    assert "Scheduling" in text and "=====" not in text
    assert "The schedule function is described in the overview." in text
    assert "Use nice to change priority." in text
    assert "Real-time tasks are special." in text
    assert "int main" not in text and "code-block" not in text and "_sched-doc" not in text
    assert "See LWN too." in text


def test_man_to_text_renders_macros_and_escapes():
    man = (
        '.\\" a comment\n.TH LS 1 "2020" "GNU" "User Commands"\n.SH NAME\nls \\- list directory contents\n'
        ".SH DESCRIPTION\nList information about the\n.B FILE\nentries\n\\(em sorted \\fIalphabetically\\fR.\n"
        ".TP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\ndo not ignore entries starting with .\n"
    )
    text = bc.man_to_text(man)
    assert "a comment" not in text and "\\f" not in text and ".TH" not in text
    assert "ls - list directory contents" in text
    assert "List information about the FILE entries — sorted alphabetically." in text
    assert "-a, --all" in text


def test_info_to_text_drops_headers_menus_and_tag_table():
    info = (
        "This is sed.info, produced by makeinfo.\n\nCopyright stuff.\n"
        "\x1f\nFile: sed.info,  Node: Top,  Next: Intro,  Up: (dir)\n\nGNU sed\n*******\n\n"
        "This manual documents sed, a stream editor.\n\n* Menu:\n\n* Intro::   Introduction.\n* Usage::   How to.\n\n"
        "\x1f\nFile: sed.info,  Node: Intro\n\nIntroduction\n============\n\nSed reads input line by line; *note Usage:: for more.\n"
        "\x1f\nTag Table:\nNode: Top\x7f100\n\x1f\nEnd Tag Table\n"
    )
    text = bc.info_to_text(info)
    assert "This manual documents sed, a stream editor." in text
    assert "Sed reads input line by line; Usage for more." in text
    for gone in ("File: sed.info", "* Menu:", "Tag Table", "produced by makeinfo", "********", "====="):
        assert gone not in text


def test_pod_and_plain_text():
    pod = "=head1 NAME\n\nperlintro - a brief introduction\n\n=head2 Syntax\n\nUse B<my> and C<< $x->y >> with L<perlsyn>.\n\n=cut\n\nsub code {}\n"
    text = bc.pod_to_text(pod)
    assert "NAME" in text and "Use my and $x->y with perlsyn." in text and "sub code" not in text and "=head" not in text
    assert bc.plain_to_text("Title\n=====\n\nSee |:help| and *tag* and [docs](http://x).") == "Title\n\nSee :help and tag and docs."


def test_filters_reject_short_code_and_python():
    assert bc.reject_reason("too short") == "short"
    code = "\n".join(f"x{i} = f({i});" for i in range(100))
    assert bc.reject_reason(code) == "code"
    assert bc.reject_reason(PROSE * 5 + " python" * 10) == "python"
    assert bc.reject_reason(PROSE * 5) is None
    assert "granted" not in bc.clean(PROSE + "\n\nPermission is granted to copy this document.\n\n" + PROSE)


def test_shingle_dedup_drops_overlap_keeps_unrelated_and_exact_duplicates():
    eval_text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
    overlapping = {"text": PROSE + " As they say, it is a truth universally acknowledged that a single man in possession of a good fortune must be happy.", "source": "a"}
    unrelated = {"text": PROSE, "source": "b"}
    duplicate = {"text": PROSE.upper() + "  ", "source": "c"}  # same words, different case and spacing
    kept, stats = bc.dedup([overlapping, unrelated, duplicate], {"heldout": eval_text})
    assert kept == [unrelated]
    assert stats["eval_overlap"] == 1 and stats["exact_duplicates"] == 1
    assert stats["eval_overlap_by_source"] == {"a": 1}
    # twelve shared words are not enough
    near = {"text": PROSE + " a truth universally acknowledged that a single man in possession of a", "source": "d"}
    assert bc.dedup([near], {"heldout": eval_text})[0] == [near]


def test_split_long_and_group():
    text = "\n\n".join(["para %d " % i + "word " * 50 for i in range(40)])
    pieces = bc.split_long(text, max_chars=2000)
    assert len(pieces) > 1 and all(len(p) <= 2400 for p in pieces)
    assert "\n\n".join(pieces) == text
    assert bc.group(["a" * 10] * 10, 35) == ["\n\n".join(["a" * 10] * 3)] * 3 + ["a" * 10]


def test_parts_round_trip_and_sha256_check(tmp_path):
    docs = [{"text": f"document {i} " + "naïve café 東京 " * i, "source": f"s{i % 3}"} for i in range(50)]
    parts = bc.write_parts(docs, tmp_path, part_chars=300)
    assert len(parts) > 1 and sum(p["documents"] for p in parts) == 50
    (tmp_path / "manifest.json").write_text(json.dumps({"parts": parts}))
    assert list(bc.iter_corpus(tmp_path)) == docs
    with lzma.open(tmp_path / parts[0]["file"], "rt", encoding="utf-8") as f:  # plain stdlib reading works too
        assert json.loads(f.readline()) == docs[0]
    data = bytearray((tmp_path / parts[1]["file"]).read_bytes())
    data[-20] ^= 1
    (tmp_path / parts[1]["file"]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        list(bc.iter_corpus(tmp_path))


def test_r_reader_reads_character_vectors():
    def xdr_int(v):
        return struct.pack(">i", v)

    def charsxp(s):
        b = s.encode()
        return xdr_int(0x00040009) + xdr_int(len(b)) + b

    payload = b"X\n" + xdr_int(3) + xdr_int(0x040201) + xdr_int(0x030500) + xdr_int(5) + b"UTF-8"
    payload += xdr_int(16) + xdr_int(2) + charsxp("Chapter 1") + charsxp("It is a truth")
    blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
    assert bc._RReader(bc._r_unpack(blob)).read() == ["Chapter 1", "It is a truth"]


def test_sources_file_parses_and_excludes_python():
    sources = bc.parse_sources(bc.DEFAULT_SOURCES)
    assert len(sources) > 10
    assert not any("python" in s["package"] for s in sources)
    assert {s["converter"] for s in sources} <= set(bc.CONVERTERS) | {"dict", "fortune"}
