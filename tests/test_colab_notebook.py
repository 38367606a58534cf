"""experiments/colab_smoke.ipynb runs end to end, so it cannot rot: executed with nbclient in a python3 kernel of
this interpreter (one CPU device, not the suite's 8 fake devices), in a temporary folder, and checked on the figures
its last cell prints: SFT loss finite and going down, every C3PO step trained on exactly Phi tokens, the Hugging Face
export reloads with identical logits and identical greedy tokens."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_smoke.ipynb")
PHI = 128  # the notebook's token budget


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path_factory.mktemp("colab")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices are for the suite; the notebook sees one CPU as in Colab
    env.pop("RING_JAX_SOURCE", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute(env=env)  # a failing cell (e.g. one of the notebook's own asserts) raises CellExecutionError
    code = [c for c in nb.cells if c.cell_type == "code"]
    lines = [ln for ln in _stream_text(code[-1]).splitlines() if ln.startswith("SUMMARY ")]
    assert len(lines) == 1, _stream_text(code[-1])
    return code, json.loads(lines[0][len("SUMMARY ") :]), work


def test_install_cell_is_a_no_op_when_ring_jax_is_importable(executed):
    code, _, _ = executed
    assert "nothing to install" in _stream_text(code[0])
    assert "1 cpu device(s)" in _stream_text(code[1])


def test_sft_loss_is_finite_and_goes_down(executed):
    _, s, _ = executed
    losses = s["sft_losses"]
    assert len(losses) == 30 and all(isinstance(x, float) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_every_c3po_step_trains_exactly_phi_tokens(executed):
    _, s, _ = executed
    assert len(s["rl"]) == 3
    for m in s["rl"]:
        assert m["responses"] == 16  # 4 prompts x 4 samples
        assert m["tokens"] == PHI and m["budget_shortfall"] == 0 and m["normalizer"] == PHI
        assert 1 <= m["responses_selected"] <= m["responses"] and m["discarded_tokens"] >= 0
        # an update runs iff some selected response carries signal (skip_no_signal), and then its loss is finite
        assert m["updates"] == float(m["informative_selected"] > 0)
        assert (m["loss"] == m["loss"]) == bool(m["updates"])


def test_hf_export_reloads_identically(executed):
    _, s, work = executed
    assert s["logit_diff"] <= 1e-5 and s["same_greedy_tokens"] is True
    hf = os.path.join(work, "colab_smoke_run", "hf")
    assert set(s["hf_files"]) == set(os.listdir(hf))
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(os.listdir(hf))
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["model_type"] == "bailing_moe"
