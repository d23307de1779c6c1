"""Shared test setup. Helpers (tiny models, tokenizer, corpus, run logs) live in tests/helpers.py, a plain module
that tests, DDP workers and tests/triton_interpret_cases.py import; no test module imports another."""
import sys
from pathlib import Path

TESTS = Path(__file__).parent
if str(TESTS) not in sys.path:  # `from helpers import ...` under any pytest import mode
    sys.path.insert(0, str(TESTS))
