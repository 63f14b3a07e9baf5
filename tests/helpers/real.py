"""The real-model experiment tests' experiment loader and tiny data files in the public schemas
(tests/{unit,integration}/configs/test_real.py)."""

import importlib.util
import json
import os

from tests.helpers import ROOT


def experiment(name: str, arg: str = ""):
  path = os.path.join(ROOT, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --- data sets ----------------------------------------------------------------------------------


def hh_rows(n: int, offset: int = 0) -> list[dict]:
  """HH-RLHF-style dialogues: a shared context, the better and the worse last Assistant turn."""
  rows = []
  for i in range(offset, offset + n):
    context = f"\n\nHuman: what is {i} plus two?"
    if i % 4 == 0:  # multi-turn
      context = f"\n\nHuman: hello\n\nAssistant: hi there{context}"
    rows.append(
        {
            "chosen": f"{context}\n\nAssistant: it is {i + 2}, great",
            "rejected": f"{context}\n\nAssistant: awful, no idea",
        }
    )
  return rows


def chat_rows(n: int, offset: int = 0) -> list[dict]:
  """UltraChat-200k-style rows: prompt, prompt_id and messages (sometimes ending on a user turn)."""
  rows = []
  for i in range(offset, offset + n):
    q = f"what is {i} plus two?"
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": f"it is {i + 2}"}]
    if i % 3 == 0:
      messages += [
          {"role": "user", "content": "and plus one?"},
          {"role": "assistant", "content": f"it is {i + 1}"},
      ]
    if i % 5 == 0:
      messages += [{"role": "user", "content": "thanks"}]  # dropped: nothing to learn from
    rows.append({"prompt": q, "prompt_id": f"id{i}", "messages": messages})
  return rows


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)
