"""SHD weight schedule, loss balancing (value / grad) and per-part gradient norms (shdcli/attention/balance.py),
against slow references that run one forward and one backward per part."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shdcli.attention import balance
from shdcli.errors import ShdError


# --------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("schedule,warmup,decay,max_steps,expected", [
    ("constant", 0, 0, 10, [1.0] * 10),
    ("constant", 4, 0, 8, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear_decay", 0, 4, 7, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]),
    ("linear_decay", 2, 0, 6, [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),  # decays over max_steps - warmup = 4
    ("cosine_decay", 0, 4, 6, [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2,
                               0.0, 0.0]),
    ("cosine_decay", 1, 2, 4, [1.0, 1.0, 0.5, 0.0]),
])
def test_schedule_factor_table(schedule, warmup, decay, max_steps, expected):
    got = [balance.schedule_factor(s, schedule, warmup, decay, max_steps) for s in range(max_steps)]
    assert got == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- a small model with three parts
def _model_and_parts(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)

    def parts():
        hidden = net[1](net[0](x))
        out = net[2](hidden)
        return {"task": (out - y).pow(2).mean(), "logit": out.exp().mean(),
                "shd": (hidden - 0.3).pow(2).mean()}  # like SHD: depends on the early layer only
    return net, parts


def _slow_grads(net, parts_fn, name):
    """One fresh forward and backward for one part (the reference shares nothing with balance.py)."""
    net.zero_grad(set_to_none=True)
    parts_fn()[name].backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def test_value_balance_scales_the_value_to_the_fraction_and_keeps_the_gradient_direction():
    net, parts_fn = _model_and_parts()
    parts = parts_fn()
    weights = {"task": 1.0, "logit": 0.5}
    terms = balance.weighted_terms(parts, weights, 0.3, "value")
    rest = float((parts["task"] + 0.5 * parts["logit"]).detach())
    assert float(terms["shd"].detach()) == pytest.approx(0.3 * rest, rel=1e-12)
    # the scale is detached: d term / d params = (0.3 rest / shd) * d shd / d params
    g_term = torch.autograd.grad(terms["shd"], list(net.parameters()), retain_graph=True, allow_unused=True)
    g_shd = torch.autograd.grad(parts["shd"], list(net.parameters()), allow_unused=True)
    c = 0.3 * rest / float(parts["shd"].detach())
    for a, b in zip(g_term, g_shd):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, c * b)
    none = balance.weighted_terms(parts_fn(), weights, 0.3, "none")
    assert float(none["shd"].detach()) == pytest.approx(0.3 * float(parts["shd"].detach()))


@pytest.mark.parametrize("fraction", [0.05, 0.5, 2.0])
def test_grad_balance_makes_the_shd_gradient_norm_the_fraction_of_the_rest(fraction):
    net, parts_fn = _model_and_parts()
    weights = {"task": 1.0, "logit": 0.5}
    g_task, g_logit, g_shd = (_slow_grads(net, parts_fn, k) for k in ("task", "logit", "shd"))
    rest = [a + 0.5 * b for a, b in zip(g_task, g_logit)]
    rest_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in rest))
    shd_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g_shd))
    scale = fraction * rest_norm / shd_norm

    net.zero_grad(set_to_none=True)
    params = list(net.parameters())
    terms = balance.weighted_terms(parts_fn(), weights, fraction, "grad")  # one forward
    result = balance.backward_terms(terms, params, len(params), "grad", fraction, 1)
    norms = result.norms
    assert result.scale == pytest.approx(scale, rel=1e-10)
    assert result.ratio == pytest.approx(fraction, rel=1e-10)
    assert norms["shd"] == pytest.approx(fraction * rest_norm, rel=1e-10)
    assert norms["task"] == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in g_task)), rel=1e-10)
    assert norms["logit"] == pytest.approx(0.5 * math.sqrt(sum(float(g.pow(2).sum()) for g in g_logit)), rel=1e-10)
    for p, r, s in zip(params, rest, g_shd):
        torch.testing.assert_close(p.grad, r + scale * s)


def test_per_part_backward_without_balance_equals_one_backward_and_divides_for_accumulation():
    net, parts_fn = _model_and_parts()
    params = list(net.parameters())
    weights = {"task": 1.0, "logit": 0.5}
    sum(balance.weighted_terms(parts_fn(), weights, 0.7, "none").values()).backward()
    plain = [p.grad.clone() for p in params]
    net.zero_grad(set_to_none=True)
    keep: dict = {}
    for _ in range(2):  # two micro-steps of the same batch, each divided by 2
        balance.backward_terms(balance.weighted_terms(parts_fn(), weights, 0.7, "none"), params, len(params),
                               "none", 0.7, 2, keep)
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad, g)
    # the kept per-part sums add up to the step's gradient
    total = balance.sum_grads(balance.sum_grads(keep["task"], keep["logit"]), keep["shd"])
    for t, g in zip(total, plain):
        torch.testing.assert_close(t, g)


def test_balance_needs_a_reference_term_and_per_part_modes_refuse_fsdp():
    from shdcli.recipe import validate_recipe

    base = {"teacher": "t", "student": {"path": "s"}, "data": {"path": "d.txt"}}
    with pytest.raises(ShdError, match="balance=value scales SHD .* weight 0 here"):
        validate_recipe({**base, "distill": {"balance": "value", "task": 0, "logit": 0}})
    for mode in ("grad", "agreement", "pcgrad"):
        with pytest.raises(ShdError, match=f"distill.balance: {mode} does not run with train.strategy=fsdp"):
            balance.check_supported(mode, "fsdp")
        balance.check_supported(mode, "ddp")  # each part's gradient is averaged over ranks by hand
        balance.check_supported(mode, None)
    balance.check_supported("value", "fsdp")


# --------------------------------------------------------------------------- agreement and PCGrad, two parameters
def _two_parameter_problem(task_dir: tuple[float, float], shd_dir: tuple[float, float]):
    """Parameters x, y (scalars) with losses whose gradients are known in closed form:
    task = a1 x + a2 y (gradient (a1, a2)), shd = b1 x + b2 y (gradient (b1, b2))."""
    x = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    terms = {"task": task_dir[0] * x + task_dir[1] * y, "shd": shd_dir[0] * x + shd_dir[1] * y}
    return [x, y], terms


def _reference_agreement(task_dir, shd_dir, cosines_before: list[float], beta: float = 0.9):
    """Slow, by hand: the capped SHD gradient after the running cosine has seen `cosines_before` and now."""
    ta, sa = math.hypot(*task_dir), math.hypot(*shd_dir)
    cos_now = (task_dir[0] * shd_dir[0] + task_dir[1] * shd_dir[1]) / (ta * sa)
    seen = cosines_before + [cos_now]
    ema = 0.0
    for c in seen:
        ema = beta * ema + (1 - beta) * c
    estimate = ema / (1 - beta ** len(seen))
    scale = min(1.0, max(0.0, estimate) * ta / sa)
    return [task_dir[0] + scale * shd_dir[0], task_dir[1] + scale * shd_dir[1]], scale, cos_now, estimate


@pytest.mark.parametrize("task_dir,shd_dir,history", [
    ((3.0, 4.0), (4.0, 3.0), []),  # agreeing (cos 0.96), SHD as large as the task: capped at 0.96 x
    ((3.0, 4.0), (0.4, 0.3), []),  # agreeing and small: untouched (scale 1)
    ((1.0, 0.0), (0.0, 5.0), []),  # orthogonal: SHD removed
    ((1.0, 0.0), (-2.0, 1.0), []),  # opposing: removed
    ((1.0, 0.0), (1.0, 1.0), [0.05, -0.1, 0.02]),  # a running estimate near 0 caps a helpful-looking step
])
def test_agreement_caps_the_shd_gradient_at_the_running_cosine_times_the_task(task_dir, shd_dir, history):
    agreement = balance.Agreement()
    for c in history:
        agreement.update(c)
    params, terms = _two_parameter_problem(task_dir, shd_dir)
    result = balance.backward_terms(terms, params, 2, "agreement", 1.0, 1, agreement=agreement)
    want, scale, cos_now, estimate = _reference_agreement(task_dir, shd_dir, history)
    assert [float(p.grad) for p in params] == pytest.approx(want, abs=1e-12)
    assert result.scale == pytest.approx(scale, abs=1e-12)
    assert result.cosine == pytest.approx(cos_now, abs=1e-12)
    assert agreement.estimate == pytest.approx(estimate, abs=1e-12)
    # never more than the task's own step
    assert result.norms["shd"] <= result.norms["task"] * (1 + 1e-12)


def test_agreement_state_round_trips_and_starts_from_its_first_measurement():
    agreement = balance.Agreement()
    assert agreement.estimate == 0.0  # nothing measured: SHD gets no gradient until it shows it helps
    agreement.update(0.4)
    assert agreement.estimate == pytest.approx(0.4)  # bias-corrected: the first measurement counts fully
    agreement.update(0.0)
    copy = balance.Agreement()
    copy.load_state_dict(json.loads(json.dumps(agreement.state_dict())))
    assert copy.estimate == pytest.approx(agreement.estimate) == pytest.approx((0.9 * 0.04) / (1 - 0.81))


@pytest.mark.parametrize("task_dir,shd_dir,want_shd", [
    ((1.0, 0.0), (-2.0, 1.0), (0.0, 1.0)),  # opposing: its component along the task is removed
    ((1.0, 0.0), (2.0, 1.0), (2.0, 1.0)),  # agreeing: untouched
    ((3.0, 4.0), (-3.0, -4.0), (0.0, 0.0)),  # exactly opposite: nothing left
])
def test_pcgrad_removes_only_the_opposing_component(task_dir, shd_dir, want_shd):
    params, terms = _two_parameter_problem(task_dir, shd_dir)
    result = balance.backward_terms(terms, params, 2, "pcgrad", 1.0, 1)
    got = [float(p.grad) - t for p, t in zip(params, task_dir)]
    assert got == pytest.approx(list(want_shd), abs=1e-12)
    assert result.scale == 1.0


# --------------------------------------------------------------------------- in the training loop
def _setup(tiny_models, tiny_text, **distill):
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.train import prepare

    data = {"teacher": str(tiny_models["llama"]), "student": {"from_teacher": {"layers": 2, "heads": 3}},
            "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
            # naive logits: the fused head holds one gradient for task + KD, so their norms would not split
            "distill": {"logit_impl": "naive", **distill},
            "train": {"max_steps": 4, "device": "cpu", "grad_clip": 0.0, "grad_norms_every": 1}}
    recipe = validate_recipe(data)
    return recipe, prepare(recipe, Console(quiet=True))


@pytest.mark.parametrize("every", [1, 0])  # 0: the rest in one backward, no part norms logged
def test_train_step_grad_balance_against_per_part_forwards(tiny_models, tiny_text, every):
    from shdcli.tasks.data import BatchStream
    from shdcli.train import make_optimizer, make_scheduler, step_losses, train_step

    recipe, setup = _setup(tiny_models, tiny_text, balance="grad", shd=0.2)
    setup.recipe.train.grad_norms_every = every
    batch = BatchStream(setup.train_blocks, 4, recipe.train.seed).next()
    params = [p for p in setup.student.parameters() if p.requires_grad]

    def grads_of(names):
        setup.student.zero_grad(set_to_none=True)
        _, _, _ = step_losses(setup, batch, terms := {})
        sum(terms[k] for k in names).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    rest = grads_of(["task", "logit"])
    shd = grads_of(["shd"])
    norm = lambda gs: math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))  # noqa: E731
    scale = 0.2 * norm(rest) / norm(shd)
    setup.student.zero_grad(set_to_none=True)
    opt = make_optimizer(setup.student, recipe)
    parts, grad_norm, _, _ = train_step(setup, BatchStream(setup.train_blocks, 4, recipe.train.seed), opt,
                                        make_scheduler(opt, recipe))
    assert parts["shd_coef"] == pytest.approx(scale, rel=1e-4)
    assert grad_norm == pytest.approx(norm([r + scale * s for r, s in zip(rest, shd)]), rel=1e-4)
    if every == 0:
        assert not any(k.startswith("grad_norm_") for k in parts)
    else:
        assert parts["grad_norm_shd"] == pytest.approx(0.2 * norm(rest), rel=1e-4)
        for name in ("task", "logit"):
            assert math.isfinite(parts[f"grad_norm_{name}"]) and parts[f"grad_norm_{name}"] > 0
    assert parts["total"] == pytest.approx(parts["task"] + parts["logit"] + scale * parts["shd"], rel=1e-5)


def test_train_step_agreement_against_per_part_forwards(tiny_models, tiny_text):
    """Two optimizer steps with balance=agreement: each step's SHD gradient is capped at the running cosine
    times the rest's norm, computed here from separate forwards and backwards per part."""
    from shdcli.tasks.data import BatchStream
    from shdcli.train import make_optimizer, make_scheduler, step_losses, train_step

    recipe, setup = _setup(tiny_models, tiny_text, balance="agreement", shd=1.0)
    stream = BatchStream(setup.train_blocks, 4, recipe.train.seed)
    params = [p for p in setup.student.parameters() if p.requires_grad]
    opt = make_optimizer(setup.student, recipe)
    sched = make_scheduler(opt, recipe)
    flat = lambda gs: torch.cat([g.double().flatten() for g in gs])  # noqa: E731
    ema, seen = 0.0, 0
    for _ in range(2):
        batch = BatchStream(setup.train_blocks, 4, recipe.train.seed)
        batch.load_state_dict(stream.state_dict())
        batch = batch.next()

        def grads_of(names, batch=batch):
            setup.student.zero_grad(set_to_none=True)
            step_losses(setup, batch, terms := {})
            sum(terms[k] for k in names).backward()
            return flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])

        rest, shd = grads_of(["task", "logit"]), grads_of(["shd"])
        cos = float(rest @ shd / (rest.norm() * shd.norm()))
        ema, seen = 0.9 * ema + 0.1 * cos, seen + 1
        estimate = ema / (1 - 0.9 ** seen)
        scale = min(1.0, max(0.0, estimate) * float(rest.norm() / shd.norm()))
        setup.student.zero_grad(set_to_none=True)
        parts, grad_norm, _, _ = train_step(setup, stream, opt, sched)
        assert parts["grad_cos_shd"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
        assert parts["shd_agreement"] == pytest.approx(estimate, rel=1e-4, abs=1e-6)
        assert parts["shd_coef"] == pytest.approx(scale, rel=1e-4, abs=1e-9)
        assert parts["grad_ratio_shd"] == pytest.approx(scale * float(shd.norm() / rest.norm()), rel=1e-4, abs=1e-9)
        assert parts["grad_ratio_shd"] <= 1.0 + 1e-9
        assert grad_norm == pytest.approx(float((rest + scale * shd).norm()), rel=1e-4)


def test_distill_run_logs_part_norms_every_n_steps_and_follows_the_schedule(tiny_models, tiny_text, tmp_path):
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.train import run_distillation

    data = {"teacher": str(tiny_models["llama"]), "student": {"from_teacher": {"layers": 2, "heads": 3}},
            "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
            "distill": {"shd_schedule": "linear_decay", "shd_decay_steps": 2, "layers": {"every": 2},
                        "logit_impl": "naive"},
            "train": {"max_steps": 4, "eval_every": 4, "device": "cpu", "grad_norms_every": 2},
            "output_dir": str(tmp_path / "run")}
    run_distillation(validate_recipe(data), Console(quiet=True))
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [("grad_norm_shd" in h) for h in history] == [False, True, False, True]
    assert history[1]["grad_norm_task"] > 0 and history[1]["grad_norm_logit"] > 0
    assert history[1]["grad_norm_shd"] > 0  # step index 1 of a 2-step decay: weight 0.5
    assert history[3]["grad_norm_shd"] == 0.0  # decayed to 0: no SHD gradient at all
    # shd_coef = distill.shd (1) x factor of step index 0..3: 1, 0.5, 0, 0
    assert [h["shd_coef"] for h in history] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_part_norms_cover_the_whole_accumulated_step(tiny_models, tiny_text):
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.tasks.data import BatchStream
    from shdcli.train import make_optimizer, make_scheduler, prepare, step_losses, train_step

    recipe, _ = _setup(tiny_models, tiny_text)
    data = recipe.resolved()
    data["train"]["grad_accum"] = 2
    recipe = validate_recipe(data)
    setup = prepare(recipe, Console(quiet=True))
    stream = BatchStream(setup.train_blocks, 4, recipe.train.seed)
    batches = [stream.next(), stream.next()]
    params = [p for p in setup.student.parameters() if p.requires_grad]
    expected = {}
    for name in ("task", "logit", "shd"):  # mean over the two micro-batches, one forward + backward each
        setup.student.zero_grad(set_to_none=True)
        for batch in batches:
            terms: dict = {}
            step_losses(setup, batch, terms)
            (terms[name] / 2).backward()
        expected[name] = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
    setup.student.zero_grad(set_to_none=True)
    opt = make_optimizer(setup.student, recipe)
    stream = BatchStream(setup.train_blocks, 4, recipe.train.seed)
    parts = train_step(setup, stream, opt, make_scheduler(opt, recipe))[0]
    for name, value in expected.items():
        assert parts[f"grad_norm_{name}"] == pytest.approx(value, rel=1e-4)


# --------------------------------------------------------------------------- balance auto
def test_auto_keeps_shd_for_labels_and_tokens_and_turns_it_off_for_embedding_regression():
    mode, why = balance.resolve_mode("auto", True)
    assert mode == "off" and "KD alone" in why
    assert balance.resolve_mode("auto", False) == ("none", None)
    assert balance.resolve_mode("agreement", True) == ("agreement", None)  # an explicit choice is kept


def _auto_run(tiny_models, tiny_text, tmp_path, model: str, name: str, **distill):
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.train import run_distillation

    data = {"teacher": str(tiny_models[model]), "student": {"from_teacher": {"layers": 2, "heads": 3}},
            "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
            "distill": distill, "train": {"max_steps": 3, "eval_every": 3, "device": "cpu", "grad_norms_every": 2},
            "output_dir": str(tmp_path / name)}
    console = Console(record=True, width=200)
    return run_distillation(validate_recipe(data), console), console.export_text()


def test_auto_off_trains_the_encoder_exactly_as_kd_alone_and_still_measures_shd(tiny_models, tiny_text, tmp_path):
    auto, printed = _auto_run(tiny_models, tiny_text, tmp_path, "bert", "auto")
    kd, _ = _auto_run(tiny_models, tiny_text, tmp_path, "bert", "kd", shd=0.0)
    assert auto["recipe"]["distill"]["balance"] == "auto" and auto["balance"]["mode"] == "off"
    assert "distill.balance auto -> off" in printed
    for a, b in zip(auto["history"], kd["history"]):  # bit for bit the KD-alone run
        assert "shd" not in a and a["task"] == b["task"] and a["grad_norm"] == b["grad_norm"]
    assert all(v["val_shd"] > 0 for v in auto["validation"])  # the maps are still scored against SHD's targets
    assert auto["final_eval"]["similarity_pearson"] == kd["final_eval"]["similarity_pearson"]


def test_auto_keeps_shd_on_for_a_causal_lm(tiny_models, tiny_text, tmp_path):
    metrics, _ = _auto_run(tiny_models, tiny_text, tmp_path, "llama", "causal")
    assert metrics["balance"] == {"mode": "none", "why": None}
    assert all(h["shd"] > 0 for h in metrics["history"])
