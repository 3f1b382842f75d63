"""Text generation from a model's parameters: greedy, temperature and top-k sampling.

    python -m moa_jax.sample --workdir=runs/quickstart --prompt="def " [--max_new_tokens=128]
        [--temperature=0.8] [--top_k=40] [--seed=0] [--step=N] [--num_samples=1]

--temperature=0 is greedy; --top_k=0 samples from the whole vocabulary. The model, its tokenizer and
the checkpoint (the newest unless --step) all come from the run directory.

No KV cache: each new token reruns the causal model over a fixed-length buffer (one compile), which
is plenty for looking at what a small model has learned.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("apply_fn", "top_k"))
def _next_token(apply_fn, params, buffer, position, key, temperature, top_k):
  logits = apply_fn({"params": params}, buffer)[0, position - 1]        # (V,)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][-1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  greedy = jnp.argmax(logits)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, greedy)


def generate(apply_fn, params, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0, eos_id: int | None = None) -> list[int]:
  """Returns the prompt's continuation (new token ids only). temperature 0 is greedy."""
  if not prompt:
    raise ValueError("the prompt is empty; give at least one token")
  total = len(prompt) + max_new_tokens
  buffer = np.zeros((1, total), np.int32)
  buffer[0, :len(prompt)] = prompt
  buffer = jnp.asarray(buffer)
  key = jax.random.key(seed)
  out = []
  for position in range(len(prompt), total):
    key, sub = jax.random.split(key)
    token = _next_token(apply_fn, params, buffer, position, sub, temperature, top_k)
    buffer = buffer.at[0, position].set(token)
    out.append(int(token))
    if eos_id is not None and out[-1] == eos_id:
      break
  return out


def sample_text(workdir: str, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.8,
                top_k: int = 40, seed: int = 0, step: int | None = None, num_samples: int = 1) -> list[str]:
  """Continuations of `prompt` (the prompt not included) from a run directory's checkpoint."""
  from moa_jax import rundir

  run, params, _ = rundir.restore(workdir, step)
  tok = run.data.tokenizer
  ids = tok.encode(prompt)
  if len(ids) + max_new_tokens > run.config.train.seq_len:
    print(f"note: {len(ids)} prompt + {max_new_tokens} new tokens exceed the {run.config.train.seq_len} "
          "tokens the model was trained on; text past that length degrades", file=sys.stderr)
  return [continue_text(run, params, ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + i)
          for i in range(num_samples)]


def continue_text(run, params, prompt_ids: list[int], max_new_tokens: int, *, temperature: float,
                  top_k: int, seed: int) -> str:
  """The decoded continuation of `prompt_ids` under a built run's model (moa_jax.train.Run)."""
  tok = run.data.tokenizer
  return tok.decode(generate(run.model.apply, params, prompt_ids, max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed, eos_id=tok.eos_id))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m moa_jax.sample", description="Generate text from a run's checkpoint.")
  parser.add_argument("--workdir", required=True, help="a directory written by moa_jax.train")
  parser.add_argument("--prompt", required=True, help="text to continue")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=40, help="0: no top-k filter")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed (sample i uses seed + i)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--num_samples", type=int, default=1)
  args = parser.parse_args(argv)
  from moa_jax import rundir, train

  try:
    texts = sample_text(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed, step=args.step,
                        num_samples=args.num_samples)
  except (rundir.RunDirError, train.TrainingError, ValueError) as e:
    raise SystemExit(f"error: {e}")
  for i, text in enumerate(texts):
    if args.num_samples > 1:
      print(f"--- sample {i} (seed {args.seed + i})")
    print(args.prompt + text)


if __name__ == "__main__":
  main()
