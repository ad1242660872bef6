"""Detection bench (issue 15): a corpus of real tiny training runs, healthy and broken
(``corpus``), the anchor tools' rules re-implemented (``anchors``), scoring side by side
(``score``) and ``python -m bench detection [--json FILE] [--half tune|test]`` (``cli``).
"""
