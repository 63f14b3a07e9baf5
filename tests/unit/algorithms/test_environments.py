"""Multi-turn rollouts' host half (algorithms/environments.py): call parsing, the tool
environment's observations (malformed calls, unknown tools, a tool's bad arguments), a raising
tool reported with its record, the tool format read from the chat template, and the turn loop
driven by a scripted sampler (what it queues, masks and records). The device half
(`generate.TurnSampler`) is tested in tests/unit/test_generate_turns.py."""

import jax
import numpy as np
import pytest

from rlhf_jax import generate
from rlhf_jax.algorithms import environments as envs
from rlhf_jax.data import train_tokenizer
from rlhf_jax.errors import ConfigError, ToolArgumentError
from rlhf_jax.toyworld import corpora
from rlhf_jax.toyworld.world import World


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  texts = corpora.tokenizer_texts(World(0))
  with_tools = train_tokenizer(texts, 400, tmp_path_factory.mktemp("tools"), tools=True)
  without = train_tokenizer(texts, 400, tmp_path_factory.mktemp("plain"))
  return with_tools, without


def _calculator(arguments, *, record=None):
  a, op, b = arguments.split()
  if not (a.isdigit() and b.isdigit()):
    raise ToolArgumentError(f"cannot compute {arguments!r}")
  return str({"+": int(a) + int(b), "*": int(a) * int(b)}[op])


def _broken(arguments, *, record=None):
  return 1 / 0


TOOLS = {"calculator": _calculator, "broken": _broken}


@pytest.mark.parametrize(
    "content, name, arguments",
    [
        ("<tool_call>calculator: 7 * 5</tool_call>", "calculator", "7 * 5"),
        ("Let me see. <tool_call> calculator:3 + 4 </tool_call>", "calculator", "3 + 4"),
        (
            '<tool_call>{"name": "lookup", "arguments": {"q": "x"}}</tool_call>',
            "lookup",
            {"q": "x"},
        ),
    ],
)
def test_parse_call(content, name, arguments):
  call = envs.parse_call(content)
  assert (call.name, call.arguments) == (name, arguments)


def test_tool_environment_observations():
  env = envs.ToolEnvironment(TOOLS)
  step = lambda content: env.step({"prompt": "p"}, [{"role": "assistant", "content": content}])
  assert step("<tool_call>calculator: 7 * 5</tool_call>") == envs.Observation("35")
  assert step("The answer is 35.") == envs.Observation(done=True)  # no call: the episode ends
  # The model's mistakes are observations it reads, never a crash.
  assert (
      step("calculator: 7 * 5</tool_call>").content
      == "error: a tool call must start with <tool_call>"
  )
  assert step("<tool_call>calculator 7 * 5</tool_call>").content == (
      "error: a call is written 'name: arguments'"
  )
  assert step("<tool_call>abacus: 1</tool_call>").content == (
      "error: no tool 'abacus'; tools: calculator, broken"
  )
  assert step("<tool_call>calculator: seven * 5</tool_call>").content == (
      "error: cannot compute 'seven * 5'"
  )
  assert step('<tool_call>{"name": 3}</tool_call>').content.startswith("error: a JSON call needs")


def test_a_raising_tool_is_reported_with_the_record():
  env = envs.ToolEnvironment(TOOLS)
  messages = [{"role": "assistant", "content": "<tool_call>broken: 1</tool_call>"}]
  with pytest.raises(envs.ToolError) as err:
    envs._env_step(env, {"prompt": "What is 1 / 0?"}, 5, messages)
  assert str(err.value) == (
      "tool 'broken' raised ZeroDivisionError: division by zero on record 5 (prompt "
      "'What is 1 / 0?', call '<tool_call>broken: 1</tool_call>')"
  )
  assert isinstance(err.value, ConfigError)  # the runner prints it as one line


def test_tool_format_from_the_chat_template(tokenizers):
  with_tools, without = tokenizers
  fmt = envs.ToolFormat(with_tools)
  assert (fmt.start_id, fmt.stop_id) == (7, 8)
  text = with_tools.decode(fmt.message_tokens("35"), skip_special_tokens=False)
  assert text == "<|end|>\n<|tool|>\n35<|end|>\n<|assistant|>\n"
  # A long message is cut to fit its budget, the template's tokens kept.
  cut = fmt.message_tokens("1234567890 " * 20, limit=12)
  assert len(cut) == 12 and with_tools.decode(cut[-3:], skip_special_tokens=False).endswith(
      "<|assistant|>\n"
  )
  with pytest.raises(ValueError, match=r"has no tool-call format: <tool_call> is \d+ tokens"):
    envs.ToolFormat(without)
  with pytest.raises(ConfigError, match=r"^config.ppo.tools: tokenizer .* has no tool-call format"):
    envs.load_tools((f"{__name__}:_calculator",), without, key="config.ppo.tools")


def test_tool_format_needs_a_tool_role(tokenizers):
  with_tools, _ = tokenizers
  plain_template = with_tools.chat_template.replace("'tool', ", "").replace(", 'tool'", "")
  with_tools.chat_template, saved = plain_template, with_tools.chat_template
  try:
    with pytest.raises(ValueError, match="has no tool format in its chat template"):
      envs.ToolFormat(with_tools)
  finally:
    with_tools.chat_template = saved


def test_load_tools_errors(tokenizers):
  with_tools, _ = tokenizers
  key = "config.ppo.tools"
  with pytest.raises(ConfigError, match="unknown tool 'abacus'"):
    envs.load_tools(("abacus",), with_tools, key=key)
  with pytest.raises(ConfigError, match="'calculator'|calculator are the toy world's tools"):
    envs.load_tools(("calculator",), with_tools, world=None, key=key)
  tools = envs.load_tools((f"{__name__}:_calculator",), with_tools, key=key)
  assert list(tools.env.tools) == ["_calculator"] and tools.format.stop_id == 8


class ScriptedSampler:
  """A TurnSampler stand-in: row r emits script[r][turn] (token ids) in each turn, then pauses at
  the stop token or ends with EOS; resume appends the queue first, as the device loop does."""

  length_bucket = 1

  def __init__(self, scripts, eos_id, stop_id, n):
    self.scripts, self.eos_id, self.stop_id, self.n = scripts, eos_id, stop_id, n
    self.turn = np.zeros(len(scripts), int)
    self.queues = []

  def _emit(self, tokens, lengths, forced, paused, done, rows):
    for r in rows:
      ids = self.scripts[r][self.turn[r]] if self.turn[r] < len(self.scripts[r]) else []
      self.turn[r] += 1
      for t in ids:
        if lengths[r] >= self.n:
          done[r] = True
          break
        tokens[r, lengths[r]] = t
        lengths[r] += 1
        if t == self.eos_id:
          done[r] = True
          break
        if t == self.stop_id:
          paused[r] = True
          break
      else:
        done[r] |= lengths[r] >= self.n

  def start(self, params, prompt_tokens, prompt_mask, rng, *, queue_size, samples, **kw):
    rows = len(prompt_tokens) * samples
    tokens = np.zeros((rows, self.n), np.int32)
    lengths, forced = np.zeros(rows, np.int32), np.zeros((rows, self.n), bool)
    paused, done = np.zeros(rows, bool), np.zeros(rows, bool)
    self._emit(tokens, lengths, forced, paused, done, range(rows))
    return self._state(tokens, lengths, forced, paused, done, queue_size)

  def _state(self, tokens, lengths, forced, paused, done, queue_size):
    z = np.zeros(len(tokens), np.int32)
    return generate.TurnState(
        step=np.int32(0), last=z, last_position=z, cache=None, tokens=tokens,
        logprobs=np.zeros(tokens.shape, np.float32), base_logprobs=np.zeros(tokens.shape, np.float32),
        forced=forced, lengths=lengths, done=done, paused=paused,
        queue=np.zeros((len(tokens), queue_size), np.int32), queue_len=z, queue_pos=z,
    )  # fmt: skip

  def resume(self, params, state, queue, queue_len, end, rng, **kw):
    self.queues.append((queue.copy(), queue_len.copy()))
    tokens, lengths, forced = state.tokens.copy(), state.lengths.copy(), state.forced.copy()
    done = state.done | (state.paused & ((queue_len == 0) | end))
    paused = np.zeros_like(state.paused)
    rows = np.flatnonzero(state.paused & (queue_len > 0) & ~end)
    for r in rows:
      take = min(queue_len[r], self.n - lengths[r])
      tokens[r, lengths[r] : lengths[r] + take] = queue[r, :take]
      forced[r, lengths[r] : lengths[r] + take] = True
      lengths[r] += take
    self._emit(tokens, lengths, forced, paused, done, rows)
    return self._state(tokens, lengths, forced, paused, done, queue.shape[1])


def test_rollout_runs_the_tools_between_turns(tokenizers):
  tok, _ = tokenizers
  fmt = envs.ToolFormat(tok)
  ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
  eos = tok.eos_token_id
  call = lambda body: ids(f"<tool_call>{body}</tool_call>")
  scripts = [
      [call("calculator: 7 * 5"), ids("35<|end|>\n") + [eos]],  # a call, then the answer
      [ids("12<|end|>\n") + [eos]],  # no call
      [call("calculator 7"), ids("I do not know") + [eos]],  # malformed: an error observation
      [call("calculator: 1 + 1"), call("calculator: 2 + 2"), call("calculator: 3 + 3")],
  ]
  sampler = ScriptedSampler(scripts, eos, fmt.stop_id, n=96)
  records = [{"prompt": f"q{i}"} for i in range(4)]
  out, episodes = envs.rollout(
      sampler, None, np.ones((4, 2), np.int32), np.ones((4, 2), bool), records, jax.random.key(0),
      env=envs.ToolEnvironment(TOOLS), tool_format=fmt, max_turns=2, max_new_tokens=96,
      queue_size=16, eos_id=eos, pad_id=0,
  )  # fmt: skip
  assert [e.ended for e in episodes] == ["eos", "eos", "eos", "turns"]
  assert episodes[0].messages == [
      {"role": "assistant", "content": "<tool_call>calculator: 7 * 5</tool_call>"},
      {"role": "tool", "content": "35"},
      {"role": "assistant", "content": "35"},
  ]
  assert episodes[0].calls == [
      {"name": "calculator", "arguments": "7 * 5", "output": "35", "error": False}
  ]
  assert episodes[2].calls[0]["error"] and episodes[2].messages[1]["content"].startswith("error:")
  assert [c["output"] for c in episodes[3].calls] == ["2", "4", None]  # the third call: past max
  # What the environment wrote is exactly the template's rendering, marked in tool_mask.
  queue, queue_len = sampler.queues[0]
  np.testing.assert_array_equal(queue[0, : queue_len[0]], fmt.message_tokens("35"))
  tool = np.asarray(out.tool_mask)
  at = len(call("calculator: 7 * 5"))
  np.testing.assert_array_equal(np.flatnonzero(tool[0]), np.arange(at, at + queue_len[0]))
  assert not tool[1].any()
  # The final answers are what rewards read.
  from rlhf_jax.algorithms.ppo_rollout import decode_responses

  assert decode_responses(tok, out)[:2] == ["35", "12"]
  metrics = envs.tool_metrics(episodes)
  assert metrics["call_rate"] == 0.75 and metrics["calls"] == 5 / 4
  assert metrics["error_rate"] == pytest.approx(2 / 5) and metrics["ended_turns"] == 0.25


def test_the_environments_tokens_are_left_out_of_the_losses(monkeypatch):
  """PPO's rollout with tools: the environment's tokens stay in the sequence (the model reads
  them) but out of `response_mask` (no loss, no KL, no advantage), and its rewards are added."""
  from rlhf_jax.algorithms import ppo
  from tests.helpers.ppo import ppo_cfg

  rows, n, p = 4, 6, 3
  tokens = np.arange(rows * n, dtype=np.int32).reshape(rows, n) + 10
  mask = np.ones((rows, n), bool)
  mask[1, 4:] = False
  tool = np.zeros((rows, n), bool)
  tool[0, 2:4] = True
  out = generate.GenerateOutput(
      tokens, np.zeros((rows, n), np.float32), mask, mask.sum(1), np.zeros((rows, n)), tool
  )
  episodes = [envs.Episode(reward=r) for r in (0.5, 0.0, -1.0, 0.0)]
  monkeypatch.setattr(envs, "rollout", lambda *args, **kw: (out, episodes))
  tool_sampler = envs.ToolSampler(
      type("Turns", (), {"length_bucket": 1})(), envs.Tools(None, None), max_turns=1, queue_size=8
  )
  seen = {}

  def score(policy, reference, value, reward_params, batch):
    seen.update(batch)
    zeros = np.zeros(batch["tokens"].shape, np.float32)
    return zeros, zeros, zeros, {}

  iteration = ppo._Iteration(
      sampler=tool_sampler, score=score, advantages=None, baseline=None, reward_fn=None, update=None,
      rollout_sharding=None, cfg=ppo_cfg(samples_per_prompt=2, max_new_tokens=n), eos_id=2,
      pad_id=0, estimator="grpo", single_update=False,
  )  # fmt: skip
  state = type("State", (), {"params": {"policy": None}})()
  prompts = np.ones((2, p), np.int32)
  r = iteration._rollout(
      state, None, None, prompts, np.ones((2, p), bool), np.zeros(2, bool), None, None,
      records=[{}, {}],
  )  # fmt: skip
  want = np.concatenate([np.zeros((rows, p), bool), mask & ~tool], axis=1)
  np.testing.assert_array_equal(seen["response_mask"], want)
  np.testing.assert_array_equal(seen["segment_ids"][:, p:], mask)  # still attended to
  np.testing.assert_allclose(r["reward"], [0.5, 0.0, -1.0, 0.0])
  assert r["episodes"] is episodes


def test_a_tool_message_budget_below_the_templates_own_tokens_is_refused(tokenizers):
  tok, _ = tokenizers
  fmt = envs.ToolFormat(tok)
  with pytest.raises(ConfigError, match=r"config.ppo.tool_message_tokens\) cannot hold the \d+"):
    envs.rollout(
        ScriptedSampler([[[]]], tok.eos_token_id, fmt.stop_id, n=8), None,
        np.ones((1, 2), np.int32), np.ones((1, 2), bool), [{"prompt": "q"}], jax.random.key(0),
        env=envs.ToolEnvironment(TOOLS), tool_format=fmt, max_turns=1, max_new_tokens=8,
        queue_size=fmt.overhead, eos_id=tok.eos_token_id, pad_id=0,
    )  # fmt: skip
