"""LorentzGCNLinkModule: negatives off the training edges, both losses by hand, hyper-parameters that
rebuild the module (what ``test --ckpt_path`` does), the Euclidean baseline."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_grendel.hyperbolic.data.disease import generate_disease_like, write_hgcn_folder
from lightning_grendel.hyperbolic.data.hgcn import HGCNDataModule
from lightning_grendel.hyperbolic.modules.gcn import LorentzGCNLinkModule
from tests.helpers.paths import REPO_ROOT


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = write_hgcn_folder(tmp_path_factory.mktemp("d") / "disease_lp",
                               generate_disease_like(depth=3, branching=3.0, seed=4))
    dm = HGCNDataModule(str(folder), task="lp")
    return dm.batch, dm.num_features


@pytest.mark.timeout(30)
def test_negatives_avoid_training_edges_and_self_pairs():
    n = 6
    pos = torch.tensor([[i, j] for i in range(n) for j in range(i + 1, n) if (i + j) % 3])  # a dense graph
    module = LorentzGCNLinkModule(in_features=2, num_negatives=20)
    torch.manual_seed(0)
    neg = module.sample_negatives(pos, n)
    assert neg.shape == (20 * len(pos), 2)
    edges = {tuple(e) for e in pos.tolist()} | {tuple(e[::-1]) for e in pos.tolist()}
    assert not [e for e in neg.tolist() if tuple(e) in edges or e[0] == e[1]]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loss", ["bce", "margin"])
@pytest.mark.parametrize("num_negatives", [1, 3])
def test_losses_match_their_formulas(batch, loss, num_negatives):
    b, f = batch
    module = LorentzGCNLinkModule(in_features=f, loss=loss, margin=3.0, r=1.5, t=0.5, num_negatives=num_negatives)
    torch.manual_seed(1)
    got = module.link_loss(b)
    torch.manual_seed(1)
    h = module.model.encode(b["features"], b["adjacency"])
    neg = module.sample_negatives(b["train_pos"], h.shape[0])
    d_pos = module.model.pair_sqdist(h, b["train_pos"])
    d_neg = module.model.pair_sqdist(h, neg)
    assert d_neg.shape == (num_negatives * len(d_pos),)
    if loss == "margin":  # negative j * E + i is paired with positive i
        want = torch.clamp(3.0 + d_pos[None, :] - d_neg.view(num_negatives, -1), min=0).mean()
    else:
        logits = torch.cat([(1.5 - d_pos) / 0.5, (1.5 - d_neg) / 0.5])
        want = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones_like(d_pos), torch.zeros_like(d_neg)]))
    torch.testing.assert_close(got, want)


@pytest.mark.timeout(30)
def test_saved_hyperparameters_rebuild_the_module(batch):
    _, f = batch
    module = LorentzGCNLinkModule(in_features=f, geometry="euclidean", loss="margin")
    params = set(inspect.signature(LorentzGCNLinkModule.__init__).parameters) - {"self"}
    assert set(module.hparams) <= params
    clone = LorentzGCNLinkModule(**module.hparams)
    clone.load_state_dict(module.state_dict())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_a_few_steps_lower_the_loss(batch, geometry):
    b, f = batch
    torch.manual_seed(0)
    module = LorentzGCNLinkModule(in_features=f, geometry=geometry, lr=0.01)
    opt = module.configure_optimizers()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = module.link_loss(b)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and sum(losses[-5:]) < sum(losses[:5])
    scores, labels = module.link_scores(b, "val")
    assert scores.shape == labels.shape and torch.isfinite(scores).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="geometry"):
        LorentzGCNLinkModule(geometry="poincare")
    with pytest.raises(ValueError, match="loss"):
        LorentzGCNLinkModule(loss="hinge")


@pytest.mark.timeout(60)
def test_cora_lp_recipe_runs_the_benchmarked_settings():
    """docs/results/hyperbolic_graphs.md reports benchmarks/hyperbolic_graphs.py's "recipe" Cora config as
    the recipe's result: the recipe must train with exactly those settings."""
    script = REPO_ROOT / "benchmarks" / "hyperbolic_graphs.py"
    spec = importlib.util.spec_from_file_location("hyperbolic_graphs", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recipe = yaml.safe_load((REPO_ROOT / "lightning_grendel" / "recipes" / "hyperbolic" / "cora_lp.yaml").read_text())
    settings = dict(bench.CORA_CONFIGS["recipe"])
    assert recipe["trainer"]["gradient_clip_val"] == settings.pop("clip")
    model = recipe["model"]["init_args"]
    assert {key: model.get(key) for key in settings} == settings
    assert (model["hidden"], model["num_layers"]) == (16, 2)  # what the benchmark's train() builds
    assert recipe["data"]["init_args"]["link_prediction"] is True
