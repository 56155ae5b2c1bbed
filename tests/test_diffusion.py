"""task: diffusion (tasks/diffusion.py): diffusers DiT teachers and students.

The captured maps are checked against softmax(Q K^T / sqrt(d)) computed by hand from the module's own weights and
the input its attention receives; a tiny teacher trained here is distilled through the CLI (loss falls, the
student reloads with DiTTransformer2DModel.from_pretrained and denoises as it did in the run); `shd eval` and
`shd inspect-heads` run on it; without diffusers a diffusion folder is one exit-2 line naming the extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from diffusers import DDPMScheduler, DiTTransformer2DModel  # noqa: E402

from shdcli import demo  # noqa: E402
from shdcli.attention import capture  # noqa: E402
from shdcli.errors import ShdError  # noqa: E402
from shdcli.models.families import enable_capture, model_shape  # noqa: E402
from shdcli.recipe import validate_recipe  # noqa: E402
from shdcli.tasks import diffusion  # noqa: E402
from shdcli.train import make_student  # noqa: E402
from tests.conftest import run_main  # noqa: E402


def tiny_dit(heads: int = 6, head_dim: int = 4, layers: int = 2, seed: int = 0) -> diffusion.DiTModel:
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=1,
                                num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():  # adaLN-Zero starts at zero: give the blocks something to do
        for p in dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return diffusion.DiTModel(diffusion.DiTConfig.from_diffusers(dict(dit.config), dict(scheduler.config)), dit).eval()


def inputs(batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, 1, 8, 8, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, 10, (batch,), generator=g)}


def test_captured_maps_equal_softmax_qk_from_the_weights():
    model = tiny_dit()
    batch = inputs()
    with torch.no_grad():
        before = model(**batch).sample
    seen: dict[int, torch.Tensor] = {}
    def keep(module, args, kwargs, i):
        seen[i] = kwargs.get("hidden_states", args[0] if args else None)

    handles = [block.attn1.register_forward_pre_hook(lambda m, a, kw, i=i: keep(m, a, kw, i), with_kwargs=True)
               for i, block in enumerate(model.dit.transformer_blocks)]
    enable_capture(model)
    recorder = capture.AttentionRecorder({0, 1}, keep_values=True)
    with torch.no_grad(), recorder.active():
        after = model(**batch).sample
    for h in handles:
        h.remove()
    assert torch.allclose(after, before, atol=1e-6), "the capture processor changes the model's output"
    heads, d = 6, 4
    for i, block in enumerate(model.dit.transformer_blocks):
        x = seen[i].double()  # [B, N, D]: what attn1 reads
        attn = block.attn1
        q = (x @ attn.to_q.weight.double().T + attn.to_q.bias.double()).unflatten(-1, (heads, d)).transpose(1, 2)
        k = (x @ attn.to_k.weight.double().T + attn.to_k.bias.double()).unflatten(-1, (heads, d)).transpose(1, 2)
        reference = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)  # [B, H, N, N]
        rec = recorder.records[i]
        maps = torch.softmax(rec.query.double() @ rec.key.double().transpose(-1, -2) * rec.scaling, dim=-1)
        assert maps.shape == (3, heads, 16, 16)
        assert torch.allclose(maps, reference, atol=1e-5)
        v = (x @ attn.to_v.weight.double().T + attn.to_v.bias.double()).unflatten(-1, (heads, d)).transpose(1, 2)
        assert torch.allclose(rec.value.double(), v, atol=1e-5)


def test_frechet_distance_matches_the_scipy_formula():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 5, generator=g), torch.randn(150, 5, generator=g) * 1.5 + 0.3
    mu_a, mu_b = a.double().mean(0).numpy(), b.double().mean(0).numpy()
    s_a, s_b = torch.cov(a.double().T).numpy(), torch.cov(b.double().T).numpy()
    root = linalg.sqrtm(s_a @ s_b).real
    want = ((mu_a - mu_b) ** 2).sum() + (s_a + s_b - 2 * root).trace()
    assert diffusion.frechet_distance(a, b) == pytest.approx(float(want), rel=1e-6)
    assert diffusion.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_batches_are_seeded_by_their_rows_and_noise_to_the_schedule():
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    rows = diffusion.NoisedImages(images, torch.arange(10), abar, "epsilon", seed=3)
    one, again = rows.batch(torch.tensor([1, 4, 7])), rows.batch(torch.tensor([1, 4, 7]))
    assert all(torch.equal(one[k], again[k]) for k in one)
    a = abar[one["timestep"]].float().sqrt()[:, None, None, None]
    s = (1 - abar[one["timestep"]]).float().sqrt()[:, None, None, None]
    assert torch.allclose(one["hidden_states"], a * images[[1, 4, 7]] + s * one["labels"], atol=1e-6)
    other = rows.batch(torch.tensor([1, 4, 8]))
    assert not torch.equal(other["labels"][:2], one["labels"][:2])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dit") / "teacher"
    demo.make_dit_teacher(out, hidden=24, heads=6, layers=2, steps=150, batch_size=32, lr=3e-3, log=lambda *a: None)
    return out


def test_distil_loss_falls_student_reloads_and_denoises(teacher, tmp_path, monkeypatch, capsys):
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "dit_digits.yaml").read_text())
    recipe.update(teacher=str(teacher), output_dir=str(tmp_path / "run"))
    recipe["student"] = {"from_teacher": {"heads": 2, "init": "teacher"}}  # squeeze-consistent init, same width
    recipe["data"].update(batch_size=32, val_batches=1)
    recipe["train"].update(max_steps=40, eval_every=40, warmup_steps=5, lr=3e-3, save_every=40)
    path = tmp_path / "dit.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_main(monkeypatch, capsys, "distill", str(path))
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    task = [h["task"] for h in metrics["history"]]
    assert sum(task[-10:]) / 10 < sum(task[:10]) / 10, "the denoising loss does not fall"
    assert metrics["plan"]["student"]["heads"] == 2 and metrics["plan"]["teacher"]["heads"] == 6
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    final = metrics["final_eval"]
    # reloads as a diffusers folder with its scheduler, and denoises as it did in the run
    student_dir = tmp_path / "run" / "student"
    dit = DiTTransformer2DModel.from_pretrained(str(student_dir))
    scheduler = DDPMScheduler.from_pretrained(str(student_dir))
    assert dit.config.num_attention_heads == 2
    reloaded = diffusion.DiTModel(diffusion.DiTConfig.from_diffusers(dict(dit.config), dict(scheduler.config)), dit)
    t_model = diffusion.DiTModel.from_pretrained(teacher).eval()
    _, held, _ = diffusion.reference("builtin:digits", 1, 8, 10, 0.25)
    errors = diffusion.denoise_errors(reloaded.eval(), t_model, held, diffusion.alphas_cumprod(reloaded.config),
                                      "epsilon", "cpu")
    assert errors["student_denoise_mse"] == pytest.approx(final["student_denoise_mse"], rel=1e-4)
    assert errors["student_denoise_mse"] < 1.0  # better than predicting no noise (unit variance)
    # shd eval scores the folder against the run's teacher
    code, out, err = run_main(monkeypatch, capsys, "eval", str(student_dir), "--json")
    assert code == 0, err[-3000:]
    result = json.loads(out)
    for key in ("denoise_mse_vs_teacher", "student_sample_fd", "teacher_sample_accuracy", "samples_png"):
        assert key in result
    assert Path(result["samples_png"]).exists()


def test_inspect_heads_at_a_chosen_timestep(teacher, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "inspect-heads", str(teacher), "--data", "builtin:digits@t=300",
                              "--samples", "8", "--json")
    assert code == 0, err[-3000:]
    report = json.loads(out)
    assert report["heads"] == 6 and "t=300" not in report["data"] and "timestep 300" in report["data"]
    code, _, err = run_main(monkeypatch, capsys, "inspect-heads", str(teacher), "--data", "builtin:digits@t=x")
    assert code == 2 and "--data" in err


def test_without_diffusers_a_diffusion_folder_is_one_line_naming_the_extra(teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ShdError, match=r"pip install 'shd\[diffusion\]'"):
        diffusion.folder_config(teacher)
    shadow = tmp_path / "shadow" / "diffusers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named diffusers')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "diffusion", "teacher": str(teacher), "student": {
        "from_teacher": {"heads": 2}}, "data": {"path": "builtin:digits"}, "output_dir": str(tmp_path / "o")}))
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{Path(__file__).resolve().parents[1]}"}
    done = subprocess.run([sys.executable, "-m", "shdcli", "distill", str(recipe)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "shd[diffusion]" in lines[0], done.stderr


def test_a_narrower_student_initialised_from_the_teacher_is_refused(teacher, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"teacher": str(teacher), "student": {"from_teacher": {
        "heads": 2, "hidden_size": 12, "init": "teacher"}}, "data": {"path": "builtin:digits"},
        "output_dir": str(tmp_path / "o")}))
    code, _, err = run_main(monkeypatch, capsys, "distill", str(recipe))
    assert code == 2 and "init: random" in err


def test_a_narrower_student_has_the_mlp_its_derivation_shows(teacher):
    """A DiT's MLP is 4 x its width: a student at width 12 has 48 MLP neurons, and its derivation (the table
    `shd distill` prints) says 48, not the teacher's 96."""
    recipe = validate_recipe({"task": "diffusion", "teacher": str(teacher), "data": {"path": "builtin:digits"},
                              "student": {"from_teacher": {"heads": 2, "hidden_size": 12, "init": "random"}}})
    t_model = diffusion.DiTModel.from_pretrained(teacher)
    student, _, derivation = make_student(recipe, t_model, None, "diffusion")
    assert model_shape(t_model.config).intermediate == 96
    assert derivation.shape.intermediate == 48 == model_shape(student.config).intermediate
    assert all(len(kept) == 48 for kept in derivation.neurons)
