"""Multi-turn rollouts with tools: environments, the tool-call format, and the loop that runs them.

An environment answers each assistant turn of a conversation:

    env.step(record, messages) -> Observation(content, reward, done)

`messages` is the conversation so far (the prompt's messages, then the assistant's and the
environment's turns), its last message the assistant turn just generated; `record` the prompt's
record. `content` is the next message (a tool's output, written as a "tool" message) or None,
`reward` a per-turn reward (summed over the episode and added to the final reward of the reward
models or functions), `done` ends the episode. A turn that ends with EOS ends the episode
whatever the environment says (its reward still counts).

`ToolEnvironment(tools)` is the environment of tool use: an assistant turn that ends in a call,

    <tool_call>calculator: 7 * 5</tool_call>        (or a JSON body {"name": ..., "arguments": ...})

runs `tools["calculator"]("7 * 5", record=record)` and the result becomes the tool message. A
malformed call (no name, unknown tool, arguments the tool rejects with
`errors.ToolArgumentError`) gets an error observation ("error: ...") the model reads: the model's
mistake is part of the episode. A tool that raises anything else is a bug: the rollout stops with
`ToolError` naming the tool, the record and the call, before any update.

`ToolFormat(tokenizer)` reads the format from the tokenizer's chat template: the call markers
must be single tokens (the end marker is the sampler's stop token) and the template must render a
"tool" message; the tokens an environment writes after a call (the end of the assistant turn,
the tool message, the next assistant header) are that rendering's, so a rollout reads exactly
what SFT conversations with tool turns look like.

`rollout(...)` runs the turns on a `generate.TurnSampler`: decode until every row ends its turn
(EOS or a call), run the environment for the rows that called, queue the rendered tool messages,
resume on the same KV cache; at most `max_turns` calls per row. The returned `GenerateOutput`
marks the environment's tokens in `tool_mask` (excluded from losses and KL, `generate.model_mask`)
and each row's `Episode` records its turns, calls, tool outputs and rewards.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np

from rlhf_jax import generate
from rlhf_jax.data.tokenizer import ChatTemplateError, render_chat
from rlhf_jax.errors import ConfigError, ToolArgumentError

Tool = Callable[..., str]
CALL_START, CALL_END, TOOL_ROLE = "<tool_call>", "</tool_call>", "tool"


@dataclasses.dataclass(frozen=True)
class Observation:
  """An environment's answer to an assistant turn: the next message's content (None: none), a
  reward for the turn, and whether the episode ends."""

  content: str | None = None
  reward: float = 0.0
  done: bool = False


class Environment(Protocol):

  def step(self, record: dict, messages: list[dict]) -> Observation:
    ...


class ToolError(ConfigError):
  """A tool raised something other than ToolArgumentError (a bug in the tool, not the model's
  mistake): the run stops with the tool, the record and the call named."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """A parsed call: the tool's name, its arguments (the text after "name:", or a JSON body's
  "arguments" value) and the call's text between the markers."""

  name: str
  arguments: Any
  text: str


class MalformedCall(ValueError):
  """The call cannot be parsed; its message is the error observation's."""


def _short(text: str, n: int = 60) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= n else text[: n - 3] + "..."


def parse_call(content: str, *, start: str = CALL_START, end: str = CALL_END) -> ToolCall | None:
  """The last tool call in an assistant turn's text, None if the turn has no end marker (no call).
  The body is `name: arguments` or JSON {"name": ..., "arguments": ...}; raises MalformedCall
  when the end marker has no start marker before it or the body is neither."""
  stop = content.rfind(end)
  if stop < 0:
    return None
  begin = content.rfind(start, 0, stop)
  if begin < 0:
    raise MalformedCall(f"a tool call must start with {start}")
  body = content[begin + len(start) : stop].strip()
  if body.startswith("{"):
    try:
      parsed = json.loads(body)
    except json.JSONDecodeError as e:
      raise MalformedCall(f"the call is not valid JSON ({e.msg})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
      raise MalformedCall('a JSON call needs {"name": ..., "arguments": ...}')
    return ToolCall(parsed["name"].strip(), parsed.get("arguments", {}), body)
  name, sep, arguments = body.partition(":")
  if not sep or not name.strip() or " " in name.strip():
    raise MalformedCall("a call is written 'name: arguments'")
  return ToolCall(name.strip(), arguments.strip(), body)


class ToolEnvironment:
  """Tool use: a turn that ends in a call gets the tool's output as a tool message; a turn
  without a call ends the episode. tools: {name: fn(arguments, *, record) -> str}."""

  def __init__(self, tools: Mapping[str, Tool], *, start: str = CALL_START, end: str = CALL_END):
    if not tools:
      raise ValueError("ToolEnvironment needs at least one tool")
    self.tools, self.start, self.end = dict(tools), start, end

  def step(self, record: dict, messages: list[dict]) -> Observation:
    try:
      call = parse_call(messages[-1]["content"], start=self.start, end=self.end)
    except MalformedCall as e:
      return Observation(f"error: {e}")
    if call is None:
      return Observation(done=True)
    tool = self.tools.get(call.name)
    if tool is None:
      return Observation(f"error: no tool {call.name!r}; tools: {', '.join(self.tools)}")
    try:
      return Observation(str(tool(call.arguments, record=record)))
    except ToolArgumentError as e:
      return Observation(f"error: {e}")


class ToolFormat:
  """The tool-call format of a tokenizer's chat template (module docstring).

  stop_id: the call end marker's token id (the sampler pauses a row there); `message_tokens(c)`:
  the token ids an environment writes after a call for a tool message with content c.
  Raises ChatTemplateError when the markers are not single tokens or the template cannot render
  a tool message."""

  _CALL, _CONTENT = "\x00call\x00", "\x00content\x00"

  def __init__(self, tokenizer, *, start: str = CALL_START, end: str = CALL_END):
    self.tokenizer, self.start, self.end = tokenizer, start, end
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    ids = {}
    for marker in (start, end):
      encoded = tokenizer(marker, add_special_tokens=False)["input_ids"]
      if len(encoded) != 1:
        raise ChatTemplateError(
            f"tokenizer {name!r} has no tool-call format: {marker} is {len(encoded)} tokens, not "
            "one; use a tokenizer with tool-call tokens (the toy world's with config.world.tools)"
        )
      ids[marker] = encoded[0]
    self.start_id, self.stop_id = ids[start], ids[end]
    messages = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": self._CALL},
        {"role": TOOL_ROLE, "content": self._CONTENT},
    ]
    try:
      rendered = render_chat(tokenizer, messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 -- templates raise whatever they like
      raise ChatTemplateError(
          f"tokenizer {name!r} has no tool format in its chat template: it cannot render a "
          f"{TOOL_ROLE!r} message ({_short(e, 120)}); use a template with a tool role"
      ) from None
    after = rendered.partition(self._CALL)[2]
    if self._CONTENT not in after:
      raise ChatTemplateError(
          f"tokenizer {name!r} has no tool format in its chat template: it drops the content of "
          f"a {TOOL_ROLE!r} message; use a template with a tool role"
      )
    # The template's text around a tool message, tokenised once (it is the same for every call).
    self._before, self._after = (self._encode(text) for text in after.split(self._CONTENT))
    self.overhead = len(self._before) + len(self._after)

  def _encode(self, text: str) -> list[int]:
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]

  def message_tokens(self, content: str, limit: int | None = None) -> list[int]:
    """The ids written after a call for a tool message `content`; with `limit`, the content is
    cut (from its end) so that the whole fits in `limit` tokens."""
    before, body, after = self._before, self._encode(content), self._after
    if limit is not None:
      body = body[: max(0, limit - len(before) - len(after))]
    return before + body + after


@dataclasses.dataclass
class Episode:
  """One row's multi-turn rollout: messages (the completion's turns: assistant, tool, ...),
  calls ({"name", "arguments", "output", "error"} per call), reward (the environment's rewards
  summed), ended ("eos", "length": out of tokens or steps, "turns": a call past max_turns,
  "environment": the environment ended it)."""

  messages: list[dict] = dataclasses.field(default_factory=list)
  calls: list[dict] = dataclasses.field(default_factory=list)
  reward: float = 0.0
  ended: str = "length"

  @property
  def answer(self) -> str:
    """The last assistant message (the completion's final answer)."""
    for message in reversed(self.messages):
      if message["role"] == "assistant":
        return message["content"]
    return ""


def _conversation(record: dict) -> list[dict]:
  prompt = record.get("prompt", "")
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _env_step(env: Environment, record: dict, index: int, messages: list[dict]) -> Observation:
  """env.step, with a tool's exception turned into ToolError naming the record and the call."""
  try:
    obs = env.step(record, messages)
  except ToolError:
    raise
  except Exception as e:  # noqa: BLE001 -- a user's tool may raise anything
    content = messages[-1]["content"]
    try:
      call = parse_call(content)
    except MalformedCall:
      call = None
    what = f"tool {call.name!r}" if call is not None else f"environment {type(env).__name__}"
    raise ToolError(
        f"{what} raised {type(e).__name__}: {_short(e, 120)} on record {index} (prompt "
        f"{_short(record.get('prompt', ''))!r}, call {_short(content)!r})"
    ) from e
  if not isinstance(obs, Observation):
    raise ToolError(
        f"environment {type(env).__name__}.step returned {type(obs).__name__} on record {index}; "
        "it must return an Observation"
    )
  if not np.isfinite(obs.reward):
    raise ToolError(
        f"environment {type(env).__name__} returned reward {obs.reward} on record {index} "
        f"(prompt {_short(record.get('prompt', ''))!r})"
    )
  return obs


def rollout(
    sampler: generate.TurnSampler,
    params,
    prompt_tokens,
    prompt_mask,
    records: Sequence[dict],
    rng: jax.Array,
    *,
    env: Environment,
    tool_format: ToolFormat,
    max_turns: int,
    max_new_tokens: int,
    queue_size: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    samples: int = 1,
    max_steps: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[generate.GenerateOutput, list[Episode]]:
  """Multi-turn rollouts of [B, P] prompts (`records[b]` is prompt b's record), `samples` each.

  Returns (output [B K, N] with `tool_mask`, one Episode per row; rows b K .. b K + K - 1 are
  prompt b's). max_steps: the decode steps of all turns together (0: (max_turns + 1) x
  max_new_tokens, enough that no row is cut by it); queue_size: the most tokens one tool message
  takes (its content is cut to fit).
  """
  if len(records) != len(prompt_tokens):
    raise ValueError(f"{len(records)} records for {len(prompt_tokens)} prompts")
  if tool_format.overhead >= queue_size:
    raise ConfigError(
        f"a tool message of at most {queue_size} tokens (config.ppo.tool_message_tokens) cannot "
        f"hold the {tool_format.overhead} tokens the chat template writes around it; raise it"
    )
  max_steps = max_steps or (max_turns + 1) * max_new_tokens
  decode = dict(
      max_steps=max_steps,
      eos_id=eos_id,
      stop_id=tool_format.stop_id,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
  )
  state = sampler.start(
      params,
      prompt_tokens,
      prompt_mask,
      rng,
      max_new_tokens=max_new_tokens,
      queue_size=queue_size,
      samples=samples,
      pad_id=pad_id,
      **decode,
  )
  real = len(records) * samples
  episodes = [Episode() for _ in range(real)]
  turn_start = np.zeros(real, np.int64)
  calls = np.zeros(real, np.int64)
  open_rows = np.ones(real, bool)  # the episode is still running
  decode_text = lambda ids, skip: turn_text(tool_format.tokenizer, ids, skip)
  while True:  # at most max_turns + 1 passes: each resume follows a row's call
    tokens, lengths, paused, done = jax.device_get(
        (state.tokens, state.lengths, state.paused, state.done)
    )
    rows = state.queue.shape[0]
    queue = np.full((rows, queue_size), pad_id, np.int32)
    queue_len = np.zeros(rows, np.int32)
    end = np.zeros(rows, bool)
    for row in np.flatnonzero(open_rows & (paused[:real] | done[:real])):
      index = row // samples
      record, episode = records[index], episodes[row]
      ids = tokens[row, turn_start[row] : lengths[row]]
      eos = done[row] and len(ids) > 0 and ids[-1] == eos_id
      if eos:
        ids = ids[:-1]
      content = decode_text(ids, skip=not paused[row])
      episode.messages.append({"role": "assistant", "content": content})
      if not (paused[row] or eos):  # cut short: no environment step
        open_rows[row] = False
        continue
      if paused[row] and calls[row] >= max_turns:  # a call past the limit is not run
        _record_call(episode, content, Observation())
        episode.ended, open_rows[row], end[row] = "turns", False, True
        continue
      obs = _env_step(env, record, index, _conversation(record) + episode.messages)
      episode.reward += float(obs.reward)
      if paused[row]:
        _record_call(episode, content, obs)
      if not paused[row]:
        episode.ended, open_rows[row] = "eos", False
      elif obs.done or obs.content is None:
        episode.ended, open_rows[row], end[row] = "environment", False, True
      else:
        calls[row] += 1
        queued = tool_format.message_tokens(obs.content, limit=queue_size)
        episode.messages.append({"role": TOOL_ROLE, "content": obs.content})
        queue[row, : len(queued)] = queued
        queue_len[row] = len(queued)
        turn_start[row] = lengths[row] + len(queued)
    if not queue_len.any():
      break
    state = sampler.resume(params, state, queue, queue_len, end, rng, **decode)
  for row in np.flatnonzero(open_rows):  # still live when the steps ran out: cut short
    ids = tokens[row, turn_start[row] : lengths[row]]
    episodes[row].messages.append({"role": "assistant", "content": decode_text(ids, skip=True)})
  out = generate.turn_output(state)
  return jax.tree.map(lambda x: x[:real], out), episodes


def turn_text(tokenizer, ids, skip: bool) -> str:
  """A turn's text; with skip, special tokens dropped (a final answer) and stripped."""
  text = tokenizer.decode(np.asarray(ids, np.int64).tolist(), skip_special_tokens=skip)
  return text.strip() if skip else text


def _record_call(episode: Episode, content: str, obs: Observation) -> None:
  try:
    call = parse_call(content)
  except MalformedCall:
    call = None
  output = obs.content
  episode.calls.append(
      {
          "name": call.name if call else None,
          "arguments": call.arguments if call else None,
          "output": output,
          "error": output is None or str(output).startswith("error:"),
      }
  )


def tool_metrics(episodes: Sequence[Episode]) -> dict:
  """Rates over rows: call_rate (>= 1 call), calls (mean per row), error_rate (calls answered
  with an error), and how episodes ended."""
  n = max(len(episodes), 1)
  all_calls = [c for e in episodes for c in e.calls]
  out = {
      "call_rate": sum(bool(e.calls) for e in episodes) / n,
      "calls": len(all_calls) / n,
      "error_rate": sum(c["error"] for c in all_calls) / max(len(all_calls), 1),
  }
  for how in ("eos", "length", "turns", "environment"):
    out[f"ended_{how}"] = sum(e.ended == how for e in episodes) / n
  return out


@dataclasses.dataclass(frozen=True)
class Tools:
  """A multi-turn rollout's environment and its tool-call format (`load_tools`)."""

  env: Environment
  format: ToolFormat


def load_tools(specs: Sequence[str], tokenizer, *, world=None, key: str) -> Tools:
  """The tool environment of `specs`: the toy world's tools by name ("calculator", "lookup":
  `toyworld.tools`, built on `world`, a pipeline's `config.world`) or "package.module:function" /
  "path/to/file.py:function" callables fn(arguments, *, record) -> str, each named by its
  function's name. Errors (ConfigError, naming `key`): an unknown name, a spec that does not
  import, two tools of one name, a toy tool without a world, or a tokenizer whose chat template
  has no tool format."""
  from rlhf_jax.algorithms.reward_functions import load_function  # the same spec syntax
  from rlhf_jax.toyworld import tools as toy_tools
  from rlhf_jax.toyworld.world import World

  tools: dict[str, Tool] = {}
  toy = [s for s in specs if s in toy_tools.TOOL_NAMES]
  if toy:
    if world is None:
      raise ConfigError(
          f"{key}: {', '.join(toy)} are the toy world's tools and need its world (run the stage "
          "in a toy pipeline, which passes config.world), or name functions 'pkg.module:fn'"
      )
    tools.update(toy_tools.make_tools(World.from_config(world), toy))
  for spec in specs:
    if spec in toy_tools.TOOL_NAMES:
      continue
    if ":" not in str(spec):
      raise ConfigError(
          f"{key}: unknown tool {spec!r}; name a toy tool ({', '.join(toy_tools.TOOL_NAMES)}) or "
          "a function 'pkg.module:fn' / 'file.py:fn'"
      )
    fn = load_function(spec, key=key)
    name = str(spec).rpartition(":")[2]
    if name in tools:
      raise ConfigError(f"{key}: two tools are named {name!r}")
    tools[name] = fn
  if not tools:
    raise ConfigError(f"{key} is empty: name at least one tool")
  try:
    tool_format = ToolFormat(tokenizer)
  except ChatTemplateError as e:
    raise ConfigError(f"{key}: {e}") from None
  return Tools(ToolEnvironment(tools, start=tool_format.start, end=tool_format.end), tool_format)


class ToolSampler:
  """A `generate.Sampler`-like callable that samples multi-turn rollouts with tools, for code that
  takes a sampler (the gold evaluation): `__call__` has the sampler's contract plus `records`
  (the prompts' records; `takes_records` tells callers to pass them) and returns the output with
  `tool_mask`; `episodes` keeps the rows' episodes of every call since `reset_episodes()`."""

  takes_records = True

  def __init__(
      self,
      sampler: generate.TurnSampler,
      tools: Tools,
      *,
      max_turns: int,
      queue_size: int,
      max_steps: int = 0,
  ):
    self.sampler, self.tools = sampler, tools
    self.max_turns, self.queue_size, self.max_steps = max_turns, queue_size, max_steps
    self.length_bucket = sampler.length_bucket
    self.episodes: list[Episode] = []

  def reset_episodes(self) -> None:
    self.episodes = []

  def rollout(
      self, params, prompt_tokens, prompt_mask, records: Sequence[dict], rng: jax.Array, **decode
  ) -> tuple[generate.GenerateOutput, list[Episode]]:
    """(output, episodes) of `rollout` with this sampler's tools and limits; `decode`: its
    max_new_tokens, eos_id, pad_id, temperature, samples, top_k, top_p."""
    return rollout(
        self.sampler,
        params,
        prompt_tokens,
        prompt_mask,
        records,
        rng,
        env=self.tools.env,
        tool_format=self.tools.format,
        max_turns=self.max_turns,
        queue_size=self.queue_size,
        max_steps=self.max_steps,
        **decode,
    )

  def __call__(
      self, params, prompt_tokens, prompt_mask, rng: jax.Array, *, records: Sequence[dict], **decode
  ) -> generate.GenerateOutput:
    out, episodes = self.rollout(params, prompt_tokens, prompt_mask, records, rng, **decode)
    self.episodes += episodes
    return out
