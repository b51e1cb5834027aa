"""Sample-quality evaluation (score_toolkit.evaluation), the shipped digits classifier, and the
``likelihood`` / ``evaluate`` / ``plot`` commands."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from score_toolkit import evaluation as E
from score_toolkit.analytic import GaussianMixture, ring_mixture
from score_toolkit.cli import main as cli_main

sklearn = pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits as sk

    from score_toolkit.data import load_digits

    return load_digits().data, torch.as_tensor(sk().target)


@pytest.fixture(scope="module")
def classifier():
    from score_toolkit.digits_classifier import load_digits_classifier

    return load_digits_classifier()


# ------------------------------------------------------------------------------------------ classifier
def test_split_is_fixed_and_disjoint():
    from score_toolkit.digits_classifier import held_out_indices, train_indices

    ho, tr = held_out_indices(), train_indices()
    assert ho.tolist() == list(range(1437, 1797)) and tr.tolist() == list(range(1437))


def test_shipped_classifier_accuracy_on_held_out_digits(digits, classifier):
    from score_toolkit.digits_classifier import SHIPPED_FOLDER, held_out_indices

    images, targets = digits
    ho = held_out_indices()
    labels, conf, feats = classifier.predict(images[ho])
    acc = float((labels == targets[ho]).double().mean())
    assert acc >= 0.95, acc
    assert feats.shape == (len(ho), 64) and torch.all((conf > 0.1) & (conf <= 1))
    # the model card states the accuracy this test measures
    card = (SHIPPED_FOLDER / "README.md").read_text()
    stated = float(re.search(r"held-out accuracy[^|]*\| \*\*([0-9.]+)\*\*", card).group(1))
    assert stated == pytest.approx(acc, abs=5e-5)
    weights = SHIPPED_FOLDER / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 1_000_000


def test_classifier_rejects_bad_input(classifier):
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        classifier(torch.zeros(2, 64))
    with pytest.raises(TypeError, match="floating-point"):
        classifier(torch.zeros(2, 1, 8, 8, dtype=torch.long))


# ------------------------------------------------------------------------------------------ Frechet
def test_gaussian_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    fd = E.gaussian_frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-1.0]),
                                     torch.tensor([[1.0]]))
    assert fd == pytest.approx(4.0 + 1.0)
    # non-commuting covariances against scipy's matrix square root
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    ca, cb = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(5, dtype=torch.float64)
    mu_a, mu_b = torch.randn(5, generator=g, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    ref = float((mu_a - mu_b).pow(2).sum() + torch.trace(ca) + torch.trace(cb)
                - 2 * np.trace(sqrtm(ca.numpy() @ cb.numpy())).real)
    assert E.gaussian_frechet_distance(mu_a, ca, mu_b, cb) == pytest.approx(ref, rel=1e-8)
    assert E.gaussian_frechet_distance(mu_a, ca, mu_a, ca) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples_converges():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + 1
    # N(0, I) vs N(1, 4 I): 3 + 3 (2 - 1)^2 = 6
    assert E.frechet_distance(a, b) == pytest.approx(6.0, rel=0.03)
    assert E.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same k"):
        E.frechet_distance(a, b[:, :2])


# ------------------------------------------------------------------------------------------ digits
def test_digits_floor_and_report(digits, classifier):
    images, _ = digits
    floor = E.digits_floor(classifier)
    assert 0 < floor["frechet_distance"] < 20 and floor["mean_confidence"] > 0.95
    real = E.evaluate_digits(images[0::2], nfe=0, wall_time_s=0.0, classifier=classifier)
    # the even half judged like samples gives exactly the floor
    assert real.metrics["frechet_distance"] == pytest.approx(floor["frechet_distance"], rel=1e-9)
    assert sum(real.details["class_histogram"]) == len(images[0::2])
    noise = torch.rand(900, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = E.evaluate_digits(noise, nfe=500, wall_time_s=1.5, classifier=classifier)
    assert bad.metrics["frechet_distance"] > 20 * floor["frechet_distance"]
    assert bad.metrics["mean_confidence"] < floor["mean_confidence"]
    assert bad.nfe == 500 and bad.wall_time_s == 1.5
    md = bad.to_markdown()
    assert "NFE 500" in md and "frechet_distance" in md and "Class histogram" in md
    # one class only: the histogram distance says so
    ones = images[torch.as_tensor(digits[1]) == 1][:100]
    mono = E.evaluate_digits(ones, nfe=0, wall_time_s=0.0, classifier=classifier)
    assert mono.metrics["class_histogram_tv"] > 0.8


def test_digits_report_checks_input(classifier):
    with pytest.raises(ValueError, match=r"\(n, 1, 8, 8\)"):
        E.evaluate_digits(torch.zeros(4, 64), nfe=0, wall_time_s=0.0, classifier=classifier)
    with pytest.raises(ValueError, match="finite"):
        E.evaluate_digits(torch.full((4, 1, 8, 8), math.nan), nfe=0, wall_time_s=0.0, classifier=classifier)
    with pytest.raises(ValueError, match="nfe"):
        E.evaluate_digits(torch.zeros(4, 1, 8, 8), nfe=None, wall_time_s=0.0, classifier=classifier)


# ------------------------------------------------------------------------------------------ vectors
def _half_ring() -> GaussianMixture:
    full = ring_mixture()
    return GaussianMixture(full.means[::2], full.covariances[::2])


def test_vector_report_against_the_mixture():
    m = ring_mixture()
    good = m.sample(800, generator=torch.Generator().manual_seed(10))
    rep = E.evaluate_vectors(good, nfe=12, wall_time_s=0.25, mixture=m)
    assert rep.metrics["modes_covered"] == 8 and rep.details["num_modes"] == 8
    for key in ("sliced_w2", "energy_distance", "mmd", "mode_weight_error", "within_mode_sliced_w2"):
        assert rep.metrics[key] < 3 * rep.floors[key] + 1e-3, key
    dropped = _half_ring().sample(800, generator=torch.Generator().manual_seed(11))
    bad = E.evaluate_vectors(dropped, nfe=12, wall_time_s=0.25, mixture=m)
    assert bad.metrics["modes_covered"] == 4
    assert bad.metrics["mode_weight_error"] == pytest.approx(0.5, abs=0.01)
    assert bad.metrics["sliced_w2"] > 3 * rep.metrics["sliced_w2"]
    assert rep.to_dict()["nfe"] == 12


def test_vector_report_against_a_reference_set():
    m = ring_mixture()
    ref = m.sample(2000, generator=torch.Generator().manual_seed(1))
    good = m.sample(500, generator=torch.Generator().manual_seed(2))
    rep = E.evaluate_vectors(good, nfe=0, wall_time_s=0.0, reference=ref)
    assert rep.metrics["coverage"] > 0.8 and abs(rep.metrics["density"] - 1) < 0.3
    assert set(rep.floors) == {"sliced_w2", "energy_distance", "mmd", "coverage", "density"}
    dropped = _half_ring().sample(500, generator=torch.Generator().manual_seed(3))
    bad = E.evaluate_vectors(dropped, nfe=0, wall_time_s=0.0, reference=ref)
    assert bad.metrics["coverage"] < 0.6 * rep.metrics["coverage"]
    small = E.evaluate_vectors(good, nfe=0, wall_time_s=0.0, reference=ref[:600])
    assert small.floors == {} and "fewer" in small.details["floor"]


def test_coverage_density_of_the_reference_itself():
    ref = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    cov, _ = E.coverage_density(ref, ref)
    assert cov == 1.0
    cov_far, dens_far = E.coverage_density(ref + 100, ref)
    assert cov_far == 0.0 and dens_far == 0.0


def test_vector_report_checks_input():
    m = ring_mixture()
    with pytest.raises(ValueError, match="reference set or an analytic mixture"):
        E.evaluate_vectors(torch.zeros(4, 2), nfe=0, wall_time_s=0.0)
    with pytest.raises(ValueError, match="2 features"):
        E.evaluate_vectors(torch.zeros(4, 3), nfe=0, wall_time_s=0.0, mixture=m)
    with pytest.raises(ValueError, match="wall_time_s"):
        E.evaluate_vectors(torch.zeros(4, 2), nfe=0, wall_time_s=-1.0, mixture=m)
    with pytest.raises(ValueError, match="finite"):
        E.evaluate_vectors(torch.full((4, 2), math.inf), nfe=0, wall_time_s=0.0, mixture=m)


def test_sample_and_evaluate_reports_the_sampling():
    from score_toolkit.processes import VPSDE

    m, proc = ring_mixture(), VPSDE()
    rep, out = E.sample_and_evaluate(m.score_fn(proc), proc, "pf_ode", shape=(200, 2), mixture=m,
                                     generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rep.nfe == out.nfe > 0 and rep.wall_time_s > 0
    assert rep.details["sampler"] == "pf_ode" and rep.metrics["modes_covered"] == 8


# ------------------------------------------------------------------------------------------ commands
def test_evaluate_command_writes_report_and_pictures(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = cli_main(["evaluate", "--model", "analytic:ring", "--process", "VP", "--sampler", "pf_ode",
                     "--option", "method=rk4", "--option", "num_steps=8", "--num-samples", "200",
                     "--output", str(out), "--markdown", str(tmp_path / "r.md"), "--pictures", str(tmp_path / "pics")])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert rep["nfe"] == 32 and rep["wall_time_s"] > 0 and rep["num_samples"] == 200
    assert {p.name for p in (tmp_path / "pics").iterdir()} == {"samples.png", "trajectories.png", "score_field.png"}
    assert "NFE 32" in (tmp_path / "r.md").read_text()


def test_evaluate_command_errors(capsys):
    assert cli_main(["evaluate", "--model", "analytic:ring"]) == 2
    assert "--process" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", "analytic:ring", "--process", "VP", "--option", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def _export_tiny_model(folder):
    from score_toolkit.hub import export_pipeline
    from score_toolkit.models import ScoreMLP
    from score_toolkit.processes import VPSDE

    torch.manual_seed(0)
    net = ScoreMLP(dim=2, hidden_dim=16, num_layers=1, embedding_dim=8)
    return export_pipeline(net, VPSDE(), "epsilon", "t", folder)


def test_likelihood_command_on_an_exported_model(tmp_path, capsys):
    folder = _export_tiny_model(tmp_path / "model")
    k = torch.randint(0, 17, (6, 2), generator=torch.Generator().manual_seed(0))
    data = tmp_path / "data.npy"
    np.save(data, (k.numpy() / 8.0 - 1.0).astype(np.float32))
    out = tmp_path / "ll.json"
    code = cli_main(["likelihood", "--model", str(folder), "--data-file", str(data), "--levels", "17",
                     "--method", "rk4", "--num-steps", "4", "--output", str(out), "--per-sample"])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["nfe"] == 16 and res["levels"] == 17 and len(res["per_sample"]["bpd"]) == 6
    # the reported bits/dim follow from the reported NLL by the documented formula
    nll = np.array(res["per_sample"]["nll_nats"])
    bpd = nll / (2 * math.log(2)) - math.log2(2) + math.log2(17)
    np.testing.assert_allclose(res["per_sample"]["bpd"], bpd, rtol=1e-9)
    # off-grid data, wrong shape: clear errors
    np.save(data, np.full((3, 2), 0.03, dtype=np.float32))
    assert cli_main(["likelihood", "--model", str(folder), "--data-file", str(data), "--levels", "17"]) == 1
    assert "grid" in capsys.readouterr().err
    np.save(data, np.zeros((3, 3), dtype=np.float32))
    assert cli_main(["likelihood", "--model", str(folder), "--data-file", str(data), "--method", "euler",
                     "--num-steps", "2"]) == 1
    assert "shape (B, 2)" in capsys.readouterr().err


def test_likelihood_command_on_an_analytic_model(tmp_path, capsys):
    out = tmp_path / "ll.json"
    code = cli_main(["likelihood", "--model", "analytic:ring", "--process", "VE", "--num-samples", "16",
                     "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["mean_abs_error_vs_exact_log_p_tmin"] < 0.01 and res["nfe"] > 0
    assert cli_main(["likelihood", "--model", "analytic:ring", "--process", "VE", "--num-samples", "4",
                     "--max-num-steps", "2"]) == 1
    assert "max_num_steps=2" in capsys.readouterr().err


def test_plot_command(tmp_path, capsys):
    csv_path = tmp_path / "acc.csv"
    csv_path.write_text("sampler,process,case,nfe,wsw,wsw_floor\na,VP,ring,10,0.1,0.01\na,VP,ring,20,0.05,0.01\n")
    out = tmp_path / "nfe.png"
    assert cli_main(["plot", "error-vs-nfe", "--csv", str(csv_path), "--output", str(out)]) == 0
    assert out.is_file()
    assert cli_main(["plot", "error-vs-nfe", "--csv", str(csv_path), "--metric", "x", "--output", str(out)]) == 2
    assert "metric column 'x'" in capsys.readouterr().err


def test_plot_old_out_spelling_still_works_with_a_warning(tmp_path, caplog):
    csv_path = tmp_path / "acc.csv"
    csv_path.write_text("sampler,process,case,nfe,wsw\na,VP,ring,10,0.1\na,VP,ring,20,0.05\n")
    out = tmp_path / "nfe.png"
    with caplog.at_level("WARNING", logger="score_toolkit"):
        assert cli_main(["plot", "error-vs-nfe", "--csv", str(csv_path), "--out", str(out)]) == 0
    assert out.is_file() and "--out is deprecated" in caplog.text
    assert cli_main(["plot", "error-vs-nfe", "--csv", str(csv_path)]) == 2  # --output is required
