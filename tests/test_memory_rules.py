"""The memory rule (DESIGN.md §3) for the rules whose compute is slow: the spectral and iterative rules on a narrower
model, and the calibrated rules in depth. Its own file, beside tests/test_memory.py, so that `make test`'s two workers
(one file each at a time) run the two halves of the memory tests at once.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from test_memory import NARROW, _pair, check_flat


@pytest.fixture(scope="module")
def narrow_examples(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    return _pair(tmp_path_factory.mktemp("memory_narrow"), NARROW, (2, 2), (6, 5))


@pytest.mark.parametrize("method,params", [
    ("ace", ("tau=0",)),        # two passes; τ = 0: every LIN tensor takes the normalized branch with the
                                # refinement (its largest buffers) in both examples, where with the default τ the
                                # branch follows how the experts' norms spread, which differs between them
    ("wudi", ("steps=3",)),     # Adam's buffers do not depend on the step count: a few steps keep the suite short
    ("iso_cts", ()),            # two passes, SVD slots
])
def test_peak_rss_of_the_spectral_and_iterative_rules_is_flat(narrow_examples, tmp_path, method, params):
    """The same rule on a narrower model (hidden 512, vocab 8000): their SVDs and Adam steps on a 2-core machine
    would take many minutes at hidden 1024 with a 32000-row lm_head."""
    check_flat(narrow_examples, tmp_path, method, params, (2, 6))


@pytest.fixture(scope="module")
def depth_examples(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    """4 and 12 layers, 2 experts each, with a tokenizer and one calibration file per expert."""
    from test_calibrated import WORDS, _tokenizer
    pair = _pair(tmp_path_factory.mktemp("memory_depth"), NARROW, (4, 2), (12, 2))
    for base, _ in pair.values():
        _tokenizer().save_pretrained(base)
        for t in range(2):
            (base.parent / f"task{t}.txt").write_text("\n".join(
                " ".join(WORDS[(t * 13 + i * j) % len(WORDS)] for j in range(40)) for i in range(64)) + "\n")
    return pair


@pytest.mark.parametrize("method", ["chain"])   # regmean walks the same blocks (4 → 12 layers: 585 → 613 MiB)
def test_peak_rss_of_calibrated_rules_is_flat_in_depth(depth_examples, tmp_path, method):
    """One block per model being run, one activation cache per expert (16 samples x 16 tokens x 512), one
    block's statistics: 12 layers need what 4 need (hidden 512: 256 tokens leave the Grams singular, so the solves
    take the fp64 Cholesky or the eigh route, both in the estimate). Holding the merged blocks would add ~13 MiB per
    layer, 100 MiB over the 8 more layers."""
    peaks = {}
    for size, (base, experts) in depth_examples.items():
        calib = [a for t in range(2) for a in ("--calib", base.parent / f"task{t}.txt")]
        run_cli("merge", base, *experts, "-o", tmp_path / size, "--method", method, "--device", "cpu", "-q",
                *calib, "--calib-samples", "16", "--calib-seq-len", "16", check=True, timeout=900)
        report = json.loads((tmp_path / size / "lowmerge_report.json").read_text())
        peaks[size] = report["memory"]["peak_rss_bytes"]
    print(f"{method}: 4 layers {peaks['small'] / 2**20:.0f} MiB, 12 layers {peaks['big'] / 2**20:.0f} MiB")
    assert peaks["big"] <= peaks["small"] + 48 * 2**20, peaks
