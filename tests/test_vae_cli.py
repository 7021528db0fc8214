"""``pyro-genext train|evaluate|sample vae`` and the VAE kind's data handling."""

from __future__ import annotations

import json

import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_genext.cli import main
from pyro_genext.data import load_dataset
from pyro_genext.engine import default_settings, fit, load_checkpoint, per_example_metrics
from pyro_genext.kinds.vae import build, loss, prepare
from pyro_genext.models import VAE, ImportanceWeightedELBO

SMALL = ["--z-dim", "2", "--hidden", "32", "--batch-size", "100", "--quiet"]


def test_train_evaluate_sample(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "vae", "--data", "digits", "--steps", "28", "--out", str(out),
            "--posterior-flow", "realnvp", "--num-flows", "2", "--flow-hidden", "16",
            "--objective", "iwae", "--particles", "3", *SMALL]
    assert main(args) == 0, capsys.readouterr().err
    state = load_checkpoint(out / "last.pt")
    assert state["kind"] == "vae" and state["settings"]["objective"] == "iwae"
    assert any(k.startswith("flow.") for k in state["model"])  # the flow is in the checkpoint
    capsys.readouterr()
    assert main(["evaluate", str(out), "--num-samples", "50", "--num-examples", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"elbo", "iwae", "num_samples"} <= set(result)
    assert result["num_samples"] == 50 and result["num_examples"] == 40
    assert -64 * 0.7 < result["elbo"] < result["iwae"] < 0  # nats per example: IWAE is tighter
    png = tmp_path / "s.png"
    assert main(["sample", str(out), "--num", "16", "--out", str(png), "--latent"]) == 0
    for name in ("s.png", "s_reconstructions.png", "s_latent.png"):
        f = tmp_path / name
        assert f.stat().st_size > 1000 and f.read_bytes()[:4] == b"\x89PNG", name


def test_evaluate_uses_the_validation_binarisation_and_the_evaluation_is_reproducible(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae", "--data", "digits", "--steps", "14", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    scores = []
    for _ in range(2):
        assert main(["evaluate", str(out), "--split", "val", "--num-samples", "1",
                     "--elbo-particles", "1", "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["iwae"] == scores[1]["iwae"]  # same fixed binary images (and seeded draws)
    # the one-draw ELBO of evaluate scores the images validation scored: same mean up to the
    # Monte Carlo noise of the latent draw
    state = load_checkpoint(out / "best.pt")
    assert abs(-scores[0]["elbo"] - state["best"]) < 1.0


def test_prepare_binarises_afresh_in_training_and_fixed_in_evaluation():
    data = load_dataset("digits", "val")
    vae = build({**default_settings("vae"), "z_dim": 2, "hidden": [8]}, data)
    x = data.x[:50]
    g = torch.Generator().manual_seed(0)
    a, b = prepare(vae, x, g), prepare(vae, x, g)
    assert set(a.unique().tolist()) == {0.0, 1.0} and not torch.equal(a, b)  # dynamic
    # pixel means follow the intensities v / (L - 1)
    many = torch.stack([prepare(vae, x, g) for _ in range(400)]).mean(0)
    assert (many - x / 16).abs().max() < 0.12
    # the engine's evaluation pass: one seeded generator, the same images every time
    seen = []

    def metric(m, xb):
        seen.append(xb.clone())
        return {"nelbo": -m.elbo(xb)}

    import dataclasses

    from pyro_genext.kinds.vae import VAE_KIND

    kind = dataclasses.replace(VAE_KIND, metrics=metric)
    per_example_metrics(kind, vae, x, 0, "val")
    per_example_metrics(kind, vae, x, 0, "val")
    assert torch.equal(seen[0], seen[1])
    g = build({**default_settings("vae"), "likelihood": "gaussian", "hidden": [8]}, data)
    assert torch.equal(prepare(g, x, torch.Generator()), x / 16)


def test_objectives():
    s = default_settings("vae")
    assert isinstance(loss(s), TraceMeanField_ELBO)  # Gaussian posterior: closed-form KL
    assert isinstance(loss({**s, "posterior_flow": "nice"}), Trace_ELBO)
    iwae = loss({**s, "objective": "iwae"})
    assert isinstance(iwae, ImportanceWeightedELBO) and iwae.num_particles == 5
    assert loss({**s, "objective": "iwae", "particles": 9}).num_particles == 9
    vae = build({**s, "hidden": [8], "z_dim": 2}, load_dataset("digits", "val"))
    assert isinstance(vae, VAE) and vae.input_shape == (1, 8, 8)


def test_fit_from_python_improves_validation():
    result = fit("vae", {"data": "digits", "epochs": 3, "z_dim": 4, "hidden": [64], "lr": 3e-3},
                 progress=False, log=lambda line: None)
    hist = [h["nelbo_mean"] for h in result["history"]]
    assert hist[-1] < hist[0] - 2, hist


@pytest.mark.parametrize(
    "args,needle,code",
    [
        (["--posterior-flow", "maf"], "invalid choice: 'maf'", 2),
        (["--objective", "kl"], "invalid choice: 'kl'", 2),
        (["--z-dim", "0"], ">= 1", 2),
        (["--data", "moons"], "use --likelihood gaussian", 1),
        (["--encoder", "conv", "--data", "moons", "--likelihood", "gaussian"], "(C, H, W)", 1),
    ],
)
def test_errors(args, needle, code, tmp_path, capsys):
    base = ["train", "vae", "--out", str(tmp_path / "r"), "--steps", "1", "--quiet"]
    if "--data" not in args:
        base += ["--data", "digits"]
    assert main(base + args) == code
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err, err


def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    common = ["train", "vae", "--data", "digits", "--posterior-flow", "nice", "--num-flows", "2",
              "--flow-hidden", "8", "--particles", "2", "--checkpoint-every", "5", *SMALL]
    assert_resume_is_exact(tmp_path, common)


def assert_resume_is_exact(tmp_path, common: list[str]) -> tuple[dict, dict]:
    """20 steps in one run, and 10 then resumed to 20: the same parameters, bit for bit."""
    assert main([*common, "--steps", "20", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--steps", "10", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", "vae", "--out", str(tmp_path / "b"), "--resume", "--steps", "20", "--quiet"]) == 0
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 20
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    return a, b


def test_vae_kind_checks_a_split_once_and_the_model_skips_value_checks_when_told():
    import torch

    from pyro_genext.checks import data_checks
    from pyro_genext.kinds.vae import check_data
    from pyro_genext.models import VAE

    m = VAE((1, 4, 4), 2, hidden_dims=(8,))
    m.data_levels = 17
    good = torch.randint(0, 17, (6, 1, 4, 4)).float()
    check_data(m, good)
    with pytest.raises(ValueError, match=r"grey levels in \[0, 16\]"):
        check_data(m, good + 17)
    with pytest.raises(ValueError, match="finite"):
        check_data(m, good * float("nan"))
    with data_checks(False):  # what the engine's steps run in: no value read back
        m.elbo(torch.full((2, 1, 4, 4), 3.0))
        with pytest.raises(ValueError, match="expected data of shape"):  # shapes always
            m.elbo(torch.zeros(2, 4, 4))


def test_kl_warm_up_weights_per_step_and_resume_mid_warm_up_is_exact(tmp_path, capsys):
    import dataclasses

    from pyro_genext.kinds.vae import VAE_KIND, on_step

    seen: list[tuple[int, float]] = []

    def recording(m, step, s):
        on_step(m, step, s)
        seen.append((step, m.kl_weight))

    kind = dataclasses.replace(VAE_KIND, on_step=recording)
    fit(kind, {"data": "digits", "steps": 6, "z_dim": 2, "hidden": [8], "kl_warmup": 4},
        progress=False, log=lambda line: None)
    assert seen == [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (4, 1.0), (5, 1.0)]
    common = ["train", "vae", "--data", "digits", "--prior-flow", "realnvp", "--num-flows", "2",
              "--flow-hidden", "8", "--kl-warmup", "30", "--checkpoint-every", "5", *SMALL]
    a, b = assert_resume_is_exact(tmp_path, common)  # resumed at step 10 of a 30-step warm-up
    assert b["settings"]["kl_warmup"] == 30
    # a different warm-up trains differently (the setting is used, not ignored)
    assert main([*common[:-len(SMALL)], "--kl-warmup", "2", *SMALL[:-1], "--quiet", "--steps", "20",
                 "--out", str(tmp_path / "c")]) == 0
    c = load_checkpoint(tmp_path / "c" / "last.pt")
    assert any(not torch.equal(v, c["model"][k]) for k, v in a["model"].items())


def test_flow_prior_round_trips_through_the_checkpoint_and_old_runs_rebuild_without_it(tmp_path, capsys):
    from pyro_genext.engine import module_from_checkpoint

    out = tmp_path / "run"
    assert main(["train", "vae", "--data", "digits", "--steps", "14", "--prior-flow", "nice",
                 "--num-flows", "2", "--flow-hidden", "8", "--free-bits", "0", "--out", str(out),
                 *SMALL]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["settings"]["prior_flow"] == "nice"
    assert any(k.startswith("prior_flow.") for k in state["model"])
    m = module_from_checkpoint(state)[0]
    assert m.prior_flow is not None
    z = torch.randn(5, 2)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    with torch.no_grad():
        # trained away from its identity start, and the rebuilt model scores with it
        standard = torch.distributions.Normal(0, 1).log_prob(z).sum(-1)
        assert not torch.allclose(m.prior((5,)).log_prob(z), standard)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--num-samples", "20", "--num-examples", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["iwae"] < 0
    # a run saved before the flag existed has no prior_flow setting: the N(0, I) prior
    new = ("prior_flow", "kl_warmup", "free_bits")
    old = {k: v for k, v in default_settings("vae").items() if k not in new}
    assert build({**old, "z_dim": 2, "hidden": [8]}, load_dataset("digits", "val")).prior_flow is None


def test_warm_up_and_free_bits_flags_are_checked(tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    for flag, bad in (("--kl-warmup", "-1"), ("--free-bits", "-0.5"), ("--free-bits", "inf"),
                      ("--prior-flow", "maf")):
        assert main(["train", "vae", "--data", "digits", "--steps", "1", flag, bad, *out, *SMALL]) == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err, err
    # a combination the kind refuses is a usage error too (exit 2), found before any work
    assert main(["train", "vae", "--data", "digits", "--steps", "1", "--objective", "iwae",
                 "--kl-warmup", "5", *out, *SMALL]) == 2
    assert "need --objective elbo" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
