"""Every shipped recipe: ``lightning-grendel fit`` with tiny settings, then ``test --ckpt_path`` on the
checkpoint the fit wrote, so saved hyper-parameters can never break ``test`` (both in this process).

Multi-process recipes are covered where their launchers are tested: ``gaussian/grendel_cpu`` by
tests/splatting/grendel/test_grendel_recipes.py, ``smoke/grendel`` by tests/splatting/grendel/test_trainer.py
and tests/test_cli_fit_render.py, ``pipeline/tiny_lm_3stages`` and ``pipeline/tensor_parallel`` by
tests/pipeline/test_cli.py, the other two pipeline recipes by tests/test_docs_commands.py (docs/pipeline.md
runs them); ``gaussian/grendel_gpu`` needs CUDA, ``gaussian/scaling_w4`` (four ranks) runs in
tests/benchmarks/test_scaling_quick.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_grendel._recipes import recipe_names
from lightning_grendel.cli import main
from lightning_grendel.hyperbolic.data.disease import generate_disease_like, write_hgcn_folder

TINY = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false"]
COVERED_ELSEWHERE = {"gaussian/grendel_cpu", "gaussian/grendel_gpu", "gaussian/scaling_w4", "smoke/grendel",
                     "pipeline/tensor_parallel", "pipeline/tiny_lm_3stages", "pipeline/tiny_lm_2stages_allgather",
                     "pipeline/lorentz_seq_depth_2stages"}
SHARED = {"gaussian/blender": "nerf_synthetic_blocks", "gaussian/colmap": "colmap_blocks",
          "hyperbolic/cora": "cora", "hyperbolic/cora_lp": "cora", "hyperbolic/wn18rr": "wn18rr"}
GENERATED = {"hyperbolic/disease_lp": "disease_lp", "hyperbolic/disease_nc": "disease_nc",
             "hyperbolic/airport_lp": "airport"}
EXTRA = {"gaussian/demo": ["--data.image_width", "32"], "gaussian/blender": ["--data.image_width", "32"],
         "gaussian/colmap": ["--data.image_width", "32"], "smoke/gaussian": [],
         "hyperbolic/wn18rr": ["--trainer.limit_train_batches", "2"],
         "hyperbolic/disease_nc": ["--data.val_fraction", "0.3", "--data.test_fraction", "0.3"],
         "hyperbolic/seq_depth": ["--data.num_train", "64"], "hyperbolic/seq_reverse": ["--data.num_train", "64"]}


def test_the_recipe_list_is_covered():
    assert set(recipe_names()) - COVERED_ELSEWHERE, "no recipe left for this file"
    assert COVERED_ELSEWHERE <= set(recipe_names()), "a recipe named here no longer exists"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [n for n in recipe_names() if n not in COVERED_ELSEWHERE])
def test_fit_then_test_from_the_checkpoint(name, tmp_path, shared_dataset, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["-c", name, "--trainer.default_root_dir", str(tmp_path / "run"), *TINY, *EXTRA.get(name, [])]
    if name in SHARED:
        args += ["--data.path", str(shared_dataset(SHARED[name]))]
    if name in GENERATED:
        folder = write_hgcn_folder(tmp_path / GENERATED[name], generate_disease_like(depth=3, branching=4.0, seed=0))
        args += ["--data.path", str(folder)]
    main(["fit", *args])
    (last,) = Path(tmp_path / "run").rglob("last.ckpt")  # LastCheckpoint in every recipe
    main(["test", *args, "--ckpt_path", str(last)])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(GENERATED))
def test_an_hgcn_recipe_without_a_path_names_it(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", name, "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "pass --data.path" in capsys.readouterr().err
