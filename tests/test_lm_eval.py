"""lm-evaluation-harness on a tiny saved DiJiang model, offline, on the task in tests/lm_eval_task/.

Stock `--model hf` in a fresh process (trust_remote_code) and the registered "dijiang" type must agree with
each other and with scoring the model directly. Skipped where the optional lm-eval is not installed.
"""
import glob
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model

import dijiang
from dijiang import conversion

TASK_DIR = Path(__file__).parent / "lm_eval_task"
TASK = "dijiang_tiny_choice"
SRC = Path(dijiang.__file__).resolve().parent.parent
HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed (optional: pip install lm-eval)")


def test_missing_lm_eval_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.delitem(sys.modules, "dijiang.lm_eval_adapter", raising=False)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        importlib.import_module("dijiang.lm_eval_adapter")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tiny = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    model, tokenizer = dijiang.load_pretrained(str(tiny))
    dijiang.convert(model, {"window": 4})
    folder = conversion.save_converted(model.eval(), tokenizer, tmp_path_factory.mktemp("saved") / "converted")
    return tiny, folder, model, tokenizer


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """lm_eval run from the task folder (its data_files path is relative), caches inside tmp_path."""
    monkeypatch.chdir(TASK_DIR)
    for name, value in offline_env(tmp_path).items():
        monkeypatch.setenv(name, value)


def offline_env(tmp_path) -> dict:
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
            "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(log_probs[t - 1, ids[t]]) for t in range(len(context_ids), len(ids)))


def accuracy(results: dict) -> float:
    return results["results"][TASK]["acc,none"]


@needs_lm_eval
def test_dijiang_type_is_hflm_on_the_cpu_and_scores_like_the_model(saved, offline):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from dijiang.lm_eval_adapter import DiJiangLM

    _, folder, model, tokenizer = saved
    assert get_model("dijiang") is DiJiangLM and issubclass(DiJiangLM, HFLM)
    lm = DiJiangLM(pretrained=str(folder), batch_size=2)
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = [("The cat sat on the", " mat"), ("Two plus two is", " four")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (context, continuation), (logprob, _) in zip(pairs, lm.loglikelihood(requests)):
        assert logprob == pytest.approx(direct_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)


@needs_lm_eval
def test_convert_on_the_fly(saved, offline):
    from dijiang.lm_eval_adapter import DiJiangLM

    tiny, _, _, _ = saved
    lm = DiJiangLM(pretrained=str(tiny), convert="true", window="4", sinks="2", batch_size=2)
    assert lm.model.config.dijiang["window"] == 4 and lm.model.config.dijiang_layers == [0, 1]
    assert lm.model.config.dijiang["sinks"] == 2


@needs_lm_eval
def test_stock_hf_in_a_fresh_process_agrees_with_the_dijiang_type(saved, offline, tmp_path, monkeypatch):
    from dijiang import lm_eval_adapter

    _, folder, _, _ = saved
    common = ["--tasks", TASK, "--include_path", str(TASK_DIR), "--batch_size", "2"]
    stock_out = tmp_path / "stock"
    env = dict(os.environ, **offline_env(tmp_path),
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    stock = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True",
         "--device", "cpu", "--output_path", str(stock_out), *common],
        cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert stock.returncode == 0, stock.stdout[-3000:] + stock.stderr[-3000:]
    ours_out = tmp_path / "ours"
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # main() sets sys.argv for lm_eval's parser
    assert lm_eval_adapter.main(["--model", "dijiang", "--model_args", f"pretrained={folder}",
                                 "--output_path", str(ours_out), *common]) == 0  # no --device: the CPU here
    stock_results, ours_results = (json.loads(Path(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read_text())
                                   for out in (stock_out, ours_out))
    assert accuracy(stock_results) == accuracy(ours_results)
    assert stock_results["n-samples"][TASK]["effective"] == 6
