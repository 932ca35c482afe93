"""tools/header_completions.py on hand-written completions: the cut at the first dedent (the body's
indentation being its first statement line's, the prompt's four spaces plus any the model added), and
the `ast.parse` check of header + body."""

from __future__ import annotations

import pytest

from tools.header_completions import HEADERS, body_lines, cut_at_dedent, judge, parses, prompt_of

CUTS = [
    # (what the model wrote after "header\n    ", kept, dedent found)
    ("return x + 1\n\ndef g():\n    pass\n", "return x + 1\n\n", True),
    ("x = 1\n    return x\nclass B:\n", "x = 1\n    return x\n", True),
    ("if x:\n        y = 2\n    return y\n", "if x:\n        y = 2\n    return y\n", False),  # no dedent
    ("        return None\n\n    def test(self):\n", "        return None\n\n", True),  # body at 12 spaces
    ("\n\n        a = 1\n    b\n", "\n\n        a = 1\n", True),  # blank lines first: the body starts at a = 1
    ("x = 1\n\tdone()\n", "x = 1\n", True),  # a tab is not the body's four spaces
    ("pass", "pass", False),
    ("", "", False),
]


@pytest.mark.parametrize("generated, kept, found", CUTS)
def test_the_completion_is_cut_at_the_first_dedent(generated, kept, found):
    assert cut_at_dedent(generated) == (kept, found)


@pytest.mark.parametrize("generated, expected", [
    ("return x + 1\n\ndef g():\n    pass\n", True),
    ("        return None\n\n    def test(self):\n", True),
    ("if x:\n        y = 2\n    return y\n", True),
    ("return (x +\n", False),  # cut mid-expression
    ("\n", False),  # an empty body
    ("x = 'open\n", False),
    ("x = 1\x00\n", False),  # a null byte: ast.parse raises ValueError on older Pythons
])
def test_the_header_and_cut_body_parse_or_not(generated, expected):
    completion = judge("def f(x):", generated, tokens=len(generated))
    assert completion.parses is expected
    assert completion.source == "def f(x):\n    " + completion.kept
    assert completion.generated.startswith(completion.kept)


def test_the_fixed_headers_are_ten_function_and_class_headers_that_need_a_body():
    assert len(HEADERS) == len(set(HEADERS)) == 10
    for header in HEADERS:
        assert header.split()[0] in ("def", "class") and header.endswith(":")
        assert not parses(prompt_of(header))  # a header alone is not Python
        assert parses(prompt_of(header) + "pass\n")


@pytest.mark.parametrize("generated, lines", [
    ("return None\n", 1),  # the prompt's indented line, continued
    ("x = 1\n\n    y = 2\nprint(x)\n", 2),  # blank lines do not count; the dedent is cut away
    ("\n", 0),
])
def test_a_body_s_length_counts_its_kept_non_blank_lines(generated, lines):
    assert body_lines(judge("def f():", generated, 1)) == lines
