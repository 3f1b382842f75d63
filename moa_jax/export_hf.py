"""A run's checkpoint as a Hugging Face model directory, for the usual eval harnesses.

    python -m moa_jax.export_hf --workdir=runs/0.12b_swiglu --out=hf/0.12b_swiglu [--step=N] [--dtype=bfloat16]

The model is the one the checkpoint was trained as (its stored config, not flags). DIR gets:
- config.json, model.safetensors (written with the `safetensors` package's numpy API: no torch needed);
- tokenizer.json + tokenizer_config.json (`AutoTokenizer` / `PreTrainedTokenizerFast`): the run's tokenizer
  (a BPE trained on the corpus comes from the data cache, prepared again if it is gone). Runs with a
  sentencepiece `.model` are refused.

Dense Type-II models with one fixed activation (swiglu, geglu, reglu) are plain `LlamaForCausalLM`.
Type-I MLPs and LA / MoA models are Llama with a custom FFN: the directory also gets
modeling_moa_llama.py and config.json an `auto_map`, so `from_pretrained(DIR, trust_remote_code=True)`
loads them. MoE models are refused. Tensor mapping (per layer i, moa_jax -> Llama):

    attention.wq (D, N, H) -> self_attn.q_proj.weight (N·H, D)      wk, wv likewise (K heads)
    attention.wo (N, H, D) -> self_attn.o_proj.weight (D, N·H)
    ffn.w1 / w2 / w3       -> mlp.gate_proj / up_proj / down_proj (transposed)
    attention_norm, ffn_norm, final_norm -> input_layernorm, post_attention_layernorm, model.norm
    embedding (V, D) -> model.embed_tokens.weight;  unembed (D, V) -> lm_head.weight (V, D), absent when tied
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from moa_jax import cli

MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling", "modeling_moa_llama.py")
# moa_jax activation -> transformers.activations.ACT2FN name (the same function).
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu",
                  "relu2": "relu2", "leaky_relu": "leaky_relu", "tanh": "tanh", "identity": "linear"}
DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED = "supported: dense models (fixed-activation GLU as LlamaForCausalLM; Type-I MLP, LA and MoA as custom code)"


class ExportError(ValueError):
  """Something that stops an export; the message names the value and the fix."""


def restore(workdir: str, step: int | None = None):
  """(config, params, step, tokenizer) of a run's checkpoint, with the config stored in the checkpoint
  (moa_jax.rundir.restore: restored on this host's devices whatever mesh it was trained on)."""
  from moa_jax import rundir  # jax-heavy: imported once the arguments are checked

  try:
    run, params, step = rundir.restore(workdir, step)
  except rundir.RunDirError as e:
    raise ExportError(str(e)) from e
  check_exportable(run.config)
  return run.config, params, step, run.data.tokenizer


def check_exportable(config) -> None:
  m = config.model
  if m.get("moe") and m.moe.num_experts:
    raise ExportError(f"model.moe.num_experts = {m.moe.num_experts}: MoE models cannot be exported yet; {SUPPORTED}")
  if m.d_model % m.n_heads:
    raise ExportError(f"model.d_model = {m.d_model} is not a multiple of model.n_heads = {m.n_heads}, which "
                      f"Hugging Face's LlamaConfig requires; {SUPPORTED} with head_dim = d_model / n_heads")


def is_llama(ffn) -> bool:
  """A dense Type-II FFN with one fixed activation: exactly Llama's MLP with hidden_act = σ."""
  return ffn.type == "glu" and ffn.mix == "fixed"


def hf_config(config, eos_id: int, dtype: str) -> dict:
  m, ffn = config.model, config.model.ffn
  out = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": ffn.d_ff,
      "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
      "head_dim": m.head_dim or m.d_model // m.n_heads,
      "hidden_act": HF_ACTIVATIONS[ffn.primary],
      "max_position_embeddings": config.train.seq_len,
      "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta,                                        # transformers 4.x
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},  # transformers 5.x
      "tie_word_embeddings": bool(m.tie_embeddings),
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      "bos_token_id": eos_id, "eos_token_id": eos_id,  # documents are separated by end-of-text; no BOS
      "dtype": dtype, "torch_dtype": dtype,
  }
  if not is_llama(ffn):
    out.update({
        # model_type llama: AutoConfig (and so AutoTokenizer, which reads the config first) needs no remote
        # code; only the model class does.
        "architectures": ["MoaLlamaForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_moa_llama.MoaLlamaForCausalLM"},
        "moa_ffn": {"type": ffn.type, "mix": ffn.mix, "activations": list(ffn.activations), "sides": ffn.sides,
                    "gate": ffn.gate, "gate_bias": bool(ffn.gate_bias), "groups": ffn.groups},
    })
  return out


def hf_tensors(config, params, dtype: str) -> dict[str, np.ndarray]:
  """moa_jax parameters (layers stacked on a leading axis) -> Llama's state dict, as numpy arrays."""
  import ml_dtypes

  m = config.model
  cast = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).astype(
      {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]))
  p = {k: np.asarray(v) for k, v in _flatten(params).items()}
  d = m.d_model
  out = {"model.embed_tokens.weight": p["embedding"], "model.norm.weight": p["final_norm/scale"]}
  if not m.tie_embeddings:
    out["lm_head.weight"] = p["unembed"].T                                   # (V, D)
  for i in range(m.n_layers):
    a, f = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    out[a + "q_proj.weight"] = p["layers/attention/wq"][i].reshape(d, -1).T  # (N·H, D)
    out[a + "k_proj.weight"] = p["layers/attention/wk"][i].reshape(d, -1).T  # (K·H, D)
    out[a + "v_proj.weight"] = p["layers/attention/wv"][i].reshape(d, -1).T
    out[a + "o_proj.weight"] = p["layers/attention/wo"][i].reshape(-1, d).T  # (D, N·H)
    out[f"model.layers.{i}.input_layernorm.weight"] = p["layers/attention_norm/scale"][i]
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = p["layers/ffn_norm/scale"][i]
    out[f + "gate_proj.weight"] = p["layers/ffn/w1"][i].T                    # (F, D)
    if "layers/ffn/w2" in p:
      out[f + "up_proj.weight"] = p["layers/ffn/w2"][i].T
    out[f + "down_proj.weight"] = p["layers/ffn/w3"][i].T                    # (D, F)
    for key, value in p.items():  # LA coef (G, K); MoA gate_kernel (D, G, K), gate_bias (G, K)
      if key.startswith(("layers/ffn/mix/", "layers/ffn/mix_u/")):
        out[f + key.removeprefix("layers/ffn/").replace("/", ".")] = value[i]
  return {k: cast(v) for k, v in out.items()}


def _flatten(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def tokenizer_files(tok, max_length: int, out: str) -> None:
  """Writes the run's tokenizer (a moa_jax.data.Tokenizer backed by a tokenizer.json) into `out`."""
  import tokenizers

  if tok.path.endswith(".model"):
    raise ExportError(f"the run's tokenizer {tok.path} is a sentencepiece model; export writes tokenizer.json "
                      f"tokenizers only (data.tokenizer=PATH/tokenizer.json, or the default trained BPE)")
  shutil.copyfile(tok.path, os.path.join(out, "tokenizer.json"))
  eos = tokenizers.Tokenizer.from_file(tok.path).id_to_token(tok.eos_id)
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
               "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
               "model_max_length": max_length}, f, indent=2)


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32") -> dict:
  """Writes the Hugging Face directory `out` (which must not already hold files); returns
  {step, out, architecture, tensors, parameters}. Written to a temporary directory, then renamed."""
  if dtype not in DTYPES:
    raise ExportError(f"--dtype={dtype}; allowed: {', '.join(DTYPES)}")
  if os.path.isdir(out) and os.listdir(out):
    raise ExportError(f"--out={out} exists and is not empty; give a new directory (nothing was written)")
  config, params, step, tok = restore(workdir, step)  # refuses what cannot be exported (MoE) first
  try:
    from safetensors.numpy import save_file
  except ImportError as e:
    raise ExportError("the safetensors package is not installed; pip install -e '.[hf]'") from e
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
  umask = os.umask(0o22)  # mkdtemp makes 0700; the finished folder gets the mode os.makedirs would give
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  try:
    tokenizer_files(tok, config.train.seq_len, tmp)
    hf = hf_config(config, tok.eos_id, dtype)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    if "auto_map" in hf:
      shutil.copyfile(MODELING_FILE, os.path.join(tmp, os.path.basename(MODELING_FILE)))
    tensors = hf_tensors(config, params, dtype)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if os.path.isdir(out):
      os.rmdir(out)  # empty, checked above
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"step": step, "out": out, "architecture": hf["architectures"][0], "tensors": len(tensors),
          "parameters": int(sum(t.size for t in tensors.values()))}


@cli.command()
def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog="python -m moa_jax.export_hf",
                                   description="Export a run's checkpoint as a Hugging Face model directory.")
  parser.add_argument("--workdir", required=True, help="a directory written by moa_jax.train")
  parser.add_argument("--out", required=True, help="the Hugging Face directory to write (new or empty)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--dtype", default="float32", help=f"tensor dtype: {', '.join(DTYPES)}")
  args = parser.parse_args(argv)
  cli.check_range("--step", args.step, 1)
  r = export(args.workdir, args.out, args.step, args.dtype)
  remote = "; load with trust_remote_code=True" if r["architecture"] != "LlamaForCausalLM" else ""
  print(f"{args.workdir} step {r['step']} -> {r['out']}: {r['architecture']}, {r['tensors']} tensors, "
        f"{r['parameters'] / 1e6:.2f}M parameters{remote}")


if __name__ == "__main__":
  main()
