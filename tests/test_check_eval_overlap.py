"""scripts/check_eval_overlap.py: training documents that share a 13-word shingle with an evaluation text."""
from script_loader import load_script

check = load_script("scripts/check_eval_overlap.py")

SENTENCE = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"


def test_finds_only_the_document_that_quotes_the_text(tmp_path):
    documents = ["nothing here but other words " * 5, f"preface. {SENTENCE}. afterword", "short"]
    assert check.overlapping(documents, f"intro {SENTENCE} outro") == [1]


def test_cli_exit_code_says_whether_any_overlaps(tmp_path, capsys):
    (tmp_path / "eval.txt").write_text(SENTENCE)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("entirely different training text " * 10)
    assert check.main(["--text", str(tmp_path / "eval.txt"), str(tmp_path / "train")]) == 0
    (tmp_path / "train" / "b.txt").write_text(f"it says {SENTENCE} here")
    assert check.main(["--text", str(tmp_path / "eval.txt"), str(tmp_path / "train")]) == 1
    assert "1 of 2 documents" in capsys.readouterr().out
