"""One table of check messages (alphanet_ext/messages.py) for the compiled ops and the
float64 fallback: every entry is used by both, no source spells one out by hand, and
both give the same text for the same bad call."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

import alphanet_ext
from alphanet_ext import ops
from alphanet_ext.messages import MESSAGES, c_header

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
pytestmark = pytest.mark.skipif(not CSRC.is_dir(), reason="needs the source tree (csrc/)")


def _sources(pattern: str) -> str:
    return "\n".join(path.read_text() for path in sorted(CSRC.rglob(pattern)))


def test_every_message_is_used_by_the_compiled_ops_and_the_fallback():
    cpp = _sources("*.cpp") + _sources("*.h")
    fallback = (ROOT / "alphanet_ext" / "fallback_checks.py").read_text()
    for key in MESSAGES:
        assert f"msg::{key}" in cpp, f"{key}: no msg::{key} in csrc"
        assert f'"{key}"' in fallback, f"{key}: not raised by fallback_checks.py"


def test_no_source_spells_a_message_out_by_hand():
    """The fixed words of each template (its longest run between placeholders) appear
    in no code of csrc or of the Python fallback (comments aside) but in the table."""
    code = re.sub(r"//[^\n]*", "", _sources("*.cpp") + _sources("*.h") + _sources("*.cu"))
    texts = {"csrc": code,
             "fallback_checks.py": (ROOT / "alphanet_ext" / "fallback_checks.py").read_text(),
             "ops.py": (ROOT / "alphanet_ext" / "ops.py").read_text()}
    for key, template in MESSAGES.items():
        words = max(re.split(r"\{[a-z_]+\}", template), key=len).strip(" '()[],=")
        if len(words) < 12:
            continue
        for where, text in texts.items():
            assert words not in text, f"{where} spells out message {key!r} ({words!r})"


def test_the_generated_header_holds_every_message_as_a_c_string():
    header = c_header()
    for key, template in MESSAGES.items():
        assert f'constexpr const char* {key} = "{template}";' in header.replace("\\'", "'")


BAD_CALLS = [  # (op, arguments, the message's start after "op: ")
    ("knn", (torch.ones(3, 2), torch.ones(4, 3), 1), "queries have 2 features but keys have 3"),
    ("knn", (torch.ones(3, 2), torch.ones(4, 2, dtype=torch.float64), 1), "queries are Float but keys are Double"),
    ("knn", (torch.ones(3, 2), torch.ones(4, 2), 5), "k (5) is larger than the number of keys (4)"),
    ("knn", (torch.ones(3, 2), torch.ones(4, 2), 0), "k must be at least 1, got 0"),
    ("knn", (torch.ones(3, 2), torch.ones(4, 2), 1, "manhattan"), "metric must be 'euclidean' or 'cosine', got "
                                                                  "'manhattan'"),
    ("knn", (torch.ones(3, 2), torch.ones(4, 2), 1, "euclidean", "fast"), "ranking must be 'auto', 'screening', "
                                                                        "'int8' or 'matmul', got 'fast'"),
    ("knn", (torch.ones(3), torch.ones(4, 2), 1), "queries must be 2-D, got shape [3]"),
    ("knn", (torch.ones(3, 2, dtype=torch.long), torch.ones(4, 2), 1),
     "queries must be float16, bfloat16, float32 or float64, got Long"),
    ("alpha_combine", (torch.ones(4, 3), torch.tensor([0]), torch.tensor([[1]]), torch.ones(1, 1), 2),
     "dim must be 0 (rows) or 1 (columns), got 2"),
    ("alpha_combine", (torch.ones(4, 3), torch.tensor([0]), torch.tensor([[1, 2]]), torch.ones(1, 1)),
     "alphas must have the shape of neighbors [1, 2], got [1, 1]"),
    ("alpha_combine", (torch.ones(4, 3), torch.tensor([0, 1]), torch.tensor([[1]]), torch.ones(1, 1)),
     "neighbors must be [len(targets), k] = [2, k], got shape [1, 1]"),
    ("alpha_combine", (torch.ones(4, 3), torch.tensor([0]), torch.tensor([[9]]), torch.ones(1, 1)),
     "neighbors must lie in [0, 4) (rows of source), found 9"),
    ("alpha_combine", (torch.ones(4, 3), torch.tensor([0]), torch.tensor([[1]]), torch.zeros(1, 1)),
     "a row of alphas is all zeros, so its L1 normalisation is undefined"),
    ("alpha_combine", (torch.ones(4, 3), torch.tensor([0]), torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long)),
     "alphas must be floating point, got Long"),
    ("class_means", (torch.ones(3, 2), torch.tensor([0, 1]), 3), "labels must be 1-D with one entry per row of x (3), "
                                                                 "got shape [2]"),
    ("class_means", (torch.ones(3, 2), torch.tensor([0, 1, 1]), 0), "num_classes must be at least 1, got 0"),
]


@pytest.mark.parametrize("op,arguments,message", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_the_compiled_op_and_the_fallback_give_the_same_text(op, arguments, message, monkeypatch):
    texts = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(ops, "HAS_EXTENSION", False)
            monkeypatch.setattr(ops, "_warned", True)
        with pytest.raises(RuntimeError) as raised:
            getattr(alphanet_ext, op)(*arguments)
        texts.append(str(raised.value).splitlines()[0])
    assert texts[0] == texts[1] == f"{op}: {message}"
