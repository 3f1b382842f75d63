"""`python -m moa_jax.import_hf --model=DIR --ffn=bimoa --workdir=W`: a pretrained Llama as a moa_jax run.

Reads a Hugging Face `LlamaForCausalLM` directory (config.json, model.safetensors, tokenizer.json) and writes
the work directory `W` that `python -m moa_jax.train --config=W/config.py --workdir=W` trains on from step 0:
W/config.py (the Llama's dimensions on a size preset's training settings), W/tokenizer.json and a step-0
checkpoint. The FFN keeps the Llama's function at step 0 (the inverse of moa_jax.export_hf's mapping):
- swiglu: the same FFN.
- bila / la: LA coefficients start one-hot on silu (and identity on the W2 branch), which *is* SwiGLU.
- bimoa / moa: MoA with gate weights U = 0 is LA with coefficients φ(b); the gate bias margin is raised to
  `--gate_bias_init` (16: sigmoid gates 1 − 1e-7 and 1e-7), so the mixture is SwiGLU to ~1e-7 while every
  gate still has a gradient (Adam's updates do not shrink with it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

SILU_FFNS = ("swiglu", "la", "bila", "moa", "bimoa")  # GLU presets whose primary activation is silu
TEMPLATE = '''"""Written by python -m moa_jax.import_hf from {model}: its Llama dimensions and weights as {ffn}.

Train on:  python -m moa_jax.train --config={config} --workdir={workdir}
"""

from moa_jax import presets


def get_config():
  c = presets.lm_config(size={size!r}, ffn={ffn!r})
  c.name = {name!r}
  c.model.update({model_fields!r})
  c.model.ffn.update({ffn_fields!r})
  c.data.tokenizer = {tokenizer!r}
  return c
'''


class ImportHFError(ValueError):
  """Something that stops an import; the message names the value and the fix."""


def llama_fields(hf: dict, ffn: str) -> tuple[dict, dict]:
  """(model.* fields, model.ffn.* fields) for a Llama config.json."""
  if hf.get("model_type") != "llama":
    raise ImportHFError(f"config.json has model_type = {hf.get('model_type')!r}; import_hf reads Llama models "
                       "(model_type llama, LlamaForCausalLM)")
  if hf.get("hidden_act", "silu") != "silu" or ffn not in SILU_FFNS:
    raise ImportHFError(f"--ffn={ffn} with hidden_act = {hf.get('hidden_act')!r}; a SiLU Llama imports as one "
                       f"of {', '.join(SILU_FFNS)}")
  if hf.get("rope_scaling") or hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ImportHFError("config.json sets rope_scaling, attention_bias or mlp_bias, which moa_jax's decoder "
                       "does not have; import a plain Llama")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
  model = {"vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"], "n_heads": heads,
           "n_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": hf.get("head_dim") or d // heads,
           "rope_theta": float(rope), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
           "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}
  return model, {"d_ff": hf["intermediate_size"]}


def moa_params(init_params, tensors: dict[str, np.ndarray], model) -> dict:
  """`init_params` (moa_jax's tree, layers stacked) with every Llama tensor put in its place; the mixing
  parameters keep their initial values."""
  import jax

  n = model.n_layers
  names = {"embedding": lambda: tensors["model.embed_tokens.weight"],                   # (V, D)
           "final_norm/scale": lambda: tensors["model.norm.weight"],
           "unembed": lambda: tensors["lm_head.weight"].T}                              # (D, V)
  per_layer = {"attention/wq": ("self_attn.q_proj.weight", True), "attention/wk": ("self_attn.k_proj.weight", True),
               "attention/wv": ("self_attn.v_proj.weight", True), "attention/wo": ("self_attn.o_proj.weight", True),
               "attention_norm/scale": ("input_layernorm.weight", False),
               "ffn_norm/scale": ("post_attention_layernorm.weight", False),
               "ffn/w1": ("mlp.gate_proj.weight", True), "ffn/w2": ("mlp.up_proj.weight", True),
               "ffn/w3": ("mlp.down_proj.weight", True)}

  def place(path, leaf):
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    if key in names:
      value = names[key]()
    elif key.startswith("layers/") and key.removeprefix("layers/") in per_layer:
      name, transpose = per_layer[key.removeprefix("layers/")]
      value = np.stack([tensors[f"model.layers.{i}.{name}"] for i in range(n)])       # (L, out, in)
      value = np.swapaxes(value, 1, 2) if transpose else value                          # (L, in, out)
    elif "/mix" in key:
      return leaf
    else:
      raise ImportHFError(f"moa_jax parameter {key} has no Llama tensor")
    return np.asarray(value, np.float32).reshape(leaf.shape)  # wq (L, D, N·H) -> (L, D, N, H), wo likewise

  return jax.tree_util.tree_map_with_path(place, init_params)


def read_tensors(model_dir: str) -> dict[str, np.ndarray]:
  import glob

  from safetensors.numpy import load_file

  files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
  if not files:
    raise ImportHFError(f"--model={model_dir} holds no .safetensors files; save the model with "
                       "save_pretrained(DIR, safe_serialization=True)")
  out = {}
  for path in files:
    out.update({k: v.astype(np.float32) for k, v in load_file(path).items()})
  return out


def import_model(model_dir: str, ffn: str, workdir: str, size: str = "0.12b",
                 gate_bias_init: float = 16.0) -> dict:
  """Writes W/config.py, W/tokenizer.json and a step-0 checkpoint; returns {config, parameters}."""
  import jax

  from moa_jax import actions, checkpoint, train

  try:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
      hf = json.load(f)
  except OSError as e:
    raise ImportHFError(f"--model={model_dir}: no config.json ({e.strerror}); give a Hugging Face model directory")
  model_fields, ffn_fields = llama_fields(hf, ffn)
  if ffn in ("moa", "bimoa"):
    ffn_fields["gate_bias_init"] = gate_bias_init
  tokenizer = os.path.join(model_dir, "tokenizer.json")
  if not os.path.exists(tokenizer):
    raise ImportHFError(f"--model={model_dir} has no tokenizer.json (a fast tokenizer); save it there with "
                       "AutoTokenizer.from_pretrained(...).save_pretrained(DIR)")
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    raise ImportHFError(f"--workdir={workdir} already holds checkpoints; give a new directory (nothing was written)")
  os.makedirs(workdir, exist_ok=True)
  workdir = os.path.abspath(workdir)
  shutil.copyfile(tokenizer, os.path.join(workdir, "tokenizer.json"))
  config_file = os.path.join(workdir, "config.py")
  name = f"{os.path.basename(os.path.normpath(model_dir))}_{ffn}"
  with open(config_file, "w", encoding="utf-8") as f:
    f.write(TEMPLATE.format(model=model_dir, ffn=ffn, config=config_file, workdir=workdir, size=size, name=name,
                            model_fields=model_fields, ffn_fields=ffn_fields,
                            tokenizer=os.path.join(workdir, "tokenizer.json")))
  config = load_config(config_file)
  tensors = read_tensors(model_dir)
  run = train.build(config)
  state = train.init_state(run)
  params = moa_params(state.params, tensors, config.model)
  params = jax.tree.map(jax.device_put, params, run.state_shardings.params)
  state = train.TrainState(state.step, params, state.opt_state)
  ckpt = checkpoint.Checkpoints(workdir, config.checkpoint.every, config.checkpoint.keep)
  actions.save_checkpoint(ckpt, 0, state, run.data.train_iter(), config, tokens=0)  # as training saves
  ckpt.wait()
  ckpt.close()
  return {"config": config_file, "parameters": int(sum(np.size(x) for x in tensors.values()))}


def load_config(path: str):
  """get_config() of a config file, as --config=PATH loads it."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("moa_jax_imported_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m moa_jax.import_hf",
                                   description="A pretrained Hugging Face Llama as a moa_jax run at step 0.")
  parser.add_argument("--model", required=True, help="a LlamaForCausalLM directory (config.json, *.safetensors, "
                                                     "tokenizer.json)")
  parser.add_argument("--ffn", default="bimoa", help=f"the FFN to convert to: {', '.join(SILU_FFNS)}")
  parser.add_argument("--workdir", required=True, help="the new run directory")
  parser.add_argument("--size", default="0.12b", help="the size preset whose training settings the run takes")
  parser.add_argument("--gate_bias_init", type=float, default=16.0, help="moa / bimoa: gate logit margin at init")
  args = parser.parse_args(argv)
  from moa_jax import train
  try:
    r = import_model(args.model, args.ffn, args.workdir, args.size, args.gate_bias_init)
  except (ImportHFError, train.TrainingError, ValueError, OSError, KeyError) as e:
    raise SystemExit(f"error: {e}")
  print(f"{args.model} -> {args.workdir} step 0 ({r['parameters'] / 1e6:.2f}M Llama parameters, FFN {args.ffn}); "
        f"train on with: python -m moa_jax.train --config={r['config']} --workdir={args.workdir}")


if __name__ == "__main__":
  main()
