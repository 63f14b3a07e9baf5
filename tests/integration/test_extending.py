"""docs/algorithms.md's worked examples run as written: "Add a new loss" registers DPO-Positive and
"Add a new algorithm" Preferred-FT; each trains two steps through `python -m rlhf_jax.run` from an
experiment file made of the documented code block and a tiny config."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from rlhf_jax.train import metrics
from tests.helpers import ROOT
from tests.helpers.preference import export_lm, learnable_pairs, write_jsonl

pytestmark = pytest.mark.slow


def documented_code(section: str) -> str:
  """The first ```python block under the heading `## <section>` of docs/algorithms.md."""
  with open(os.path.join(ROOT, "docs", "algorithms.md")) as f:
    text = f.read()
  body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
  return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def run_experiment(path, workdir) -> dict:
  """`python -m rlhf_jax.run` on an experiment file, from the repository root; its final metrics."""
  proc = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.run", f"--config={path}", f"--workdir={workdir}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])["final"]


def tiny_experiment(tmp_path, code: str, configure: str) -> str:
  """An experiment file: the documented `code`, then get_config() building a tiny two-step config
  from tests/helpers' DPO config (8 fake devices, the words tokenizer) and `configure`'s lines."""
  path = tmp_path / "experiment.py"
  path.write_text(code + textwrap.dedent(f"""

          from pathlib import Path

          from tests.helpers.preference import dpo_config


          def get_config():
            c = dpo_config(Path({str(tmp_path)!r}), Path({str(tmp_path / "tok")!r}),
                           {str(tmp_path / "pairs.jsonl")!r}, steps=2)
          """) + textwrap.indent(textwrap.dedent(configure), "  ") + "  return c\n")
  return str(path)


@pytest.fixture
def inputs(tmp_path, words_tokenizer_dir):
  os.symlink(words_tokenizer_dir, tmp_path / "tok")
  export_lm(tmp_path / "lm", words_tokenizer_dir)
  write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
  return tmp_path


def test_the_documented_loss_trains_through_the_runner(inputs):
  code = documented_code("Add a new loss")
  assert '@register_pair_loss("dpop"' in code
  path = tiny_experiment(inputs, code, 'c.dpo.loss_type = "dpop"\nc.dpo.dpop.lam = 5.0\n')
  final = run_experiment(path, inputs / "dpop")
  assert final["step"] == 2 and (inputs / "dpop" / "export").exists()
  logged = [r for r in metrics.read_jsonl(inputs / "dpop" / "metrics.jsonl") if "train/loss" in r]
  assert "train/positive_penalty" in logged[-1]  # the new loss's own metric
  config = json.loads((inputs / "dpop" / "config.json").read_text())
  assert config["dpo"]["loss_type"] == "dpop" and config["dpo"]["dpop"] == {"beta": 0.1, "lam": 5.0}


def test_the_documented_algorithm_trains_through_the_runner(inputs):
  code = documented_code("Add a new algorithm")
  assert '@registry.register("preferred_ft"' in code
  configure = """\
  c.algorithm = "preferred_ft"
  c.data.update(kind="pairwise", packing=True)
  """
  final = run_experiment(tiny_experiment(inputs, code, configure), inputs / "pft")
  assert final["step"] == 2 and (inputs / "pft" / "export").exists()
  chosen = [json.loads(line) for line in (inputs / "pft" / "chosen.jsonl").read_text().splitlines()]
  assert len(chosen) == 16 and all(r["completion"].endswith(" great") for r in chosen)
