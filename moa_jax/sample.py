"""Text generation from a model's parameters: greedy, temperature and top-k sampling.

    python -m moa_jax.sample --workdir=runs/quickstart --prompt="def " [--max_new_tokens=128]
        [--temperature=0.8] [--top_k=40] [--seed=0] [--step=N] [--num_samples=1]

--temperature=0 is greedy; --top_k=0 samples from the whole vocabulary. The model, its tokenizer and
the checkpoint (the newest unless --step) all come from the run directory.

The generation loop itself lives in `moa_jax.generate` (training samples through it too).
"""

from __future__ import annotations

import sys

from moa_jax import cli, rundir
from moa_jax.generate import continue_text


def sample_text(workdir: str, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.8,
                top_k: int = 40, seed: int = 0, step: int | None = None, num_samples: int = 1) -> list[str]:
  """Continuations of `prompt` (the prompt not included) from a run directory's checkpoint."""
  run, params, _ = rundir.restore(workdir, step)
  tok = run.data.tokenizer
  ids = tok.encode(prompt)
  if len(ids) + max_new_tokens > run.config.train.seq_len:
    print(f"note: {len(ids)} prompt + {max_new_tokens} new tokens exceed the {run.config.train.seq_len} "
          "tokens the model was trained on; text past that length degrades", file=sys.stderr)
  return [continue_text(run.model, tok, params, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        seed=seed + i) for i in range(num_samples)]


@cli.command()
def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgumentParser(
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
  for name, low in (("max_new_tokens", 1), ("temperature", 0), ("top_k", 0), ("seed", 0), ("step", 1),
                    ("num_samples", 1)):
    cli.check_range(f"--{name}", getattr(args, name), low)
  texts = sample_text(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed, step=args.step,
                      num_samples=args.num_samples)
  for i, text in enumerate(texts):
    if args.num_samples > 1:
      print(f"--- sample {i} (seed {args.seed + i})")
    print(args.prompt + text)


if __name__ == "__main__":
  main()
