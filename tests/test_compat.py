"""The checkpoint allow-list admits what fairseq checkpoints hold and nothing else."""
import argparse
import fractions
import pickle

import pytest
import torch

import fairseq_pskd  # noqa: F401  (installs the allow-list)
from fairseq_pskd import compat


def test_namespace_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"args": argparse.Namespace(arch="transformer", lr=[0.1]),
                "model": {"w": torch.ones(2)}}, path)
    state = torch.load(path)  # default weights_only=True on torch >= 2.6
    assert state["args"].arch == "transformer" and state["args"].lr == [0.1]
    assert torch.equal(state["model"]["w"], torch.ones(2))


def test_foreign_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(pickle.UnpicklingError, match="fractions.Fraction"):
        torch.load(path)


def test_weights_only_not_switched_off_globally():
    # Safe loading stays the default; only the allow-list grew.
    assert torch.serialization._default_to_weights_only(None) is True
    allowed = torch.serialization.get_safe_globals()
    assert argparse.Namespace in allowed
    assert set(map(id, compat.allowed_globals())) <= set(map(id, allowed))


@pytest.mark.e2e  # the session's baseline, trained by fairseq-train
def test_foreign_object_in_real_fairseq_checkpoint_is_refused(baseline_run, tmp_path):
    """A real fairseq checkpoint with one foreign object added is refused by fairseq's loader."""
    from fairseq import checkpoint_utils

    good = baseline_run[0] / "checkpoint_last.pt"
    state = checkpoint_utils.load_checkpoint_to_cpu(str(good))  # loads with the plugin imported
    assert "model" in state
    raw = torch.load(good)
    raw["extra_state"]["payload"] = fractions.Fraction(2, 7)
    bad = tmp_path / "tampered.pt"
    torch.save(raw, bad)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint_utils.load_checkpoint_to_cpu(str(bad))


def test_numpy_metric_state_loads_but_object_arrays_do_not(tmp_path):
    """--eval-bleu checkpoints keep numpy count arrays in their metrics state: allowed. An
    object-dtype array can carry arbitrary objects: still refused."""
    import numpy as np
    path = tmp_path / "bleu.pt"
    torch.save({"extra_state": {"metrics": {"_bleu_counts": np.array([3.0, 2.0]),
                                            "best": np.float64(1.5)}}}, path)
    state = torch.load(path)
    assert state["extra_state"]["metrics"]["_bleu_counts"].tolist() == [3.0, 2.0]
    bad = tmp_path / "objarr.pt"
    torch.save({"x": np.array([fractions.Fraction(1, 2)], dtype=object)}, bad)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(bad)


@pytest.mark.e2e  # the session's baseline, trained by fairseq-train
def test_state_as_broadcast_to_other_ranks_loads(baseline_run):
    """Data-parallel resume: fairseq's broadcast_object re-pickles the loaded checkpoint (cfg
    now an omegaconf DictConfig) with torch.save and the other ranks torch.load it."""
    import io

    from fairseq import checkpoint_utils
    from omegaconf import DictConfig

    state = checkpoint_utils.load_checkpoint_to_cpu(str(baseline_run[0] / "checkpoint_last.pt"))
    assert isinstance(state["cfg"], DictConfig)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = torch.load(buf, map_location="cpu")  # weights-only, as fairseq's broadcast does
    assert again["cfg"].model.encoder_layers == state["cfg"].model.encoder_layers
