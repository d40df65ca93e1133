"""The Colab quickstart notebook runs top to bottom (tiny settings, CPU), so it cannot rot."""

import json
import os
import sys

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "experiments", "notebooks",
                        "quickstart.ipynb")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  # A kernel spec for this interpreter, so the notebook imports this checkout's package.
  spec_dir = tmp_path / "jupyter" / "kernels" / "deepexit-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "deepexit test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("DEEPEXIT_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("DEEPEXIT_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The pretrained-model section on the tiny GPT-2-shaped Hugging Face fixture.
  monkeypatch.setenv("DEEPEXIT_NOTEBOOK_HF", os.path.join(os.path.dirname(__file__),
                                                         "fixtures", "hf", "gpt2"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="deepexit-test",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "backend cpu" in text
  assert "exited at layer 2:" in text
  # The sweep cell displayed the table and the plot inline.
  data = [o["data"] for o in outputs if o.output_type == "display_data"]
  assert any("| Threshold |" in d.get("text/markdown", "") for d in data)
  assert any("image/png" in d for d in data)
  assert os.path.exists(tmp_path / "work" / "sweep" / "sweep.png")
  # The imported model was swept and decoded speculatively, identically to full depth.
  assert "2 layers, dim 32" in text
  assert "threshold 1.0: PPL" in text
  assert "identical to full depth: True" in text
