"""experiments/colab_quickstart.ipynb runs top to bottom, headless, on the debug model for a few steps."""

import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_quickstart.ipynb")


@pytest.mark.slow  # a Jupyter kernel training the debug model (~160 s on 2 busy cores)
def test_colab_quickstart_executes(data_cache, tmp_path, monkeypatch):
  monkeypatch.setenv("MOA_QUICKSTART_SIZE", "debug")
  monkeypatch.setenv("MOA_QUICKSTART_STEPS", "8")
  monkeypatch.setenv("MOA_QUICKSTART_WORKDIR", str(tmp_path / "runs"))
  monkeypatch.setenv("MOA_JAX_CACHE", data_cache)  # the data group's default cache root
  monkeypatch.setenv("MOA_JAX_REPO", ROOT)
  monkeypatch.setenv("PYTHONPATH", ROOT)  # the kernel imports this checkout
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))  # eval reuses training's compiles
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # loss curves and gate heatmap
  assert "--- swiglu\ndef " in text and "--- bimoa\ndef " in text
  assert "perplexity" in text and "final training loss" in text
  assert f"install: pip install -e {ROOT}\n" in text  # moa_jax was importable: nothing installed
  assert (tmp_path / "runs" / "loss.png").exists() and (tmp_path / "runs" / "gates.png").exists()


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


def test_the_install_cell_needs_no_clone_and_picks_jax_for_the_runtime(monkeypatch):
  """The install cell's two functions, run outside Colab: a clone URL or a wheel installs straight from pip."""
  cell = "".join(nbformat.read(NOTEBOOK, as_version=4).cells[1].source)
  scope = {}
  exec(cell.split("args = pip_args")[0], scope)
  assert scope["REPO"].startswith("https://") or os.environ.get("MOA_JAX_REPO")
  url = "https://github.com/someone/moa_jax.git"
  assert scope["pip_args"](url, "cuda12") == [f"moa_jax[cuda12] @ git+{url}"]
  assert scope["pip_args"]("https://x/moa_jax-0.1.0-py3-none-any.whl", "") == [
      "moa_jax @ https://x/moa_jax-0.1.0-py3-none-any.whl"]
  assert scope["pip_args"]("/no/such/moa_jax-0.1.0-py3-none-any.whl", "tpu") == [
      "moa_jax[tpu] @ file:///no/such/moa_jax-0.1.0-py3-none-any.whl"]
  assert scope["pip_args"](ROOT, "") == ["-e", ROOT]
  monkeypatch.setattr(scope["shutil"], "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
  monkeypatch.setattr(scope["glob"], "glob", lambda pattern: [])
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
  assert scope["runtime_extra"]() == "cuda12"
  monkeypatch.setattr(scope["glob"], "glob", lambda pattern: ["/dev/accel0"])
  assert scope["runtime_extra"]() == "tpu"
