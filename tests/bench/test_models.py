"""The bench's models and what techniques need of them: an input kind (declared with the registry's `inputs`)
is not the generic suite's test task, and residual blocks are checked on the model itself."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from effilab import bench
from effilab.bench.fit import make_model
from effilab.bench.recipes import RecipeError, check_fits_model, check_fits_task, components, parse_recipe
from effilab.bench.tasks import MODELS, RESNET_STAGES, TaskError
from effilab.core.residual import residual_blocks
from effilab.datasets import digits
from effilab.registry import all_techniques

# Techniques that need residual blocks (or blocks), not an input kind: they train on images with --model resnet.
ANY_INPUT = ("activation_checkpointing", "rezero", "fixup", "model_growth", "model_widening", "stochastic_depth",
             "progressive_layer_drop")


@pytest.fixture(scope="module")
def images():
    return digits(seed=0)


def test_model_techniques_are_not_restricted_to_their_test_task(images):
    comps = components()
    for name in ANY_INPUT:
        assert all_techniques()[name].task != "image"  # tested on the transformer by the generic suite ...
        assert comps[name].inputs == (), name  # ... and not restricted to token sequences for that
    check_fits_task([parse_recipe(n) for n in ANY_INPUT], images)  # no RecipeError on images
    check_fits_model([parse_recipe(n) for n in ANY_INPUT], make_model(images, "resnet"), "resnet", images)


def test_input_kinds_are_declared_where_a_technique_needs_them(images):
    comps = components()
    assert comps["whiten_first_conv"].inputs == ("image",)
    assert comps["progressive_resize"].inputs == ("image",)
    assert comps["seq_len_warmup"].inputs == ("sequence",)
    with pytest.raises(RecipeError, match="works on token sequences; task 'digits' has images"):
        check_fits_task([parse_recipe("seq_len_warmup")], images)


def test_registry_rejects_unknown_input_kinds():
    from effilab.registry import register

    with pytest.raises(ValueError, match="inputs must be a tuple of"):
        register("no_such_technique_inputs", lambda: None, "data", inputs=("video",))
    with pytest.raises(ValueError, match="inputs must be a tuple of"):
        register("no_such_technique_inputs", lambda: None, "data", inputs="image")


@pytest.mark.parametrize("name", ["stochastic_depth", "progressive_layer_drop", "rezero", "fixup", "model_growth",
                                  "model_widening"])
def test_a_model_without_residual_blocks_is_refused_before_training(name, images, monkeypatch):
    import effilab.bench.campaign as C

    monkeypatch.setattr(C, "fit_one", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(RecipeError, match=r"needs a residual model.*In the bench: --model resnet"):
        bench.run(images, [name], epochs=1, bs=64, model="cnn", progress=None)


def test_resnet_model(images):
    assert "resnet" in MODELS
    net = make_model(images, "resnet", width=8)
    assert len(residual_blocks(net)) == sum(RESNET_STAGES)
    assert net(torch.zeros(2, *images.input_shape)).shape == (2, images.n_classes)
    flat = bench.tasks.load_task("mnist1d", n_samples=200)
    with pytest.raises(TaskError, match="model 'resnet' needs image inputs"):
        make_model(flat, "resnet")


def test_residual_techniques_train_on_images_through_the_bench(images):
    c = bench.run(images, ["baseline", "stochastic_depth+rezero"], epochs=1, bs=64, model="resnet", width=8,
                  progress=None, matched=True)
    assert not c.failures, [f.message for f in c.failures]
    runs = {r.recipe: r for r in c.results}
    assert set(runs) >= {"baseline", "stochastic_depth+rezero"}
    sd, base = runs["stochastic_depth+rezero"], runs["baseline"]
    skipped = sum(e["flops_skipped"] for e in sd.telemetry["records"]["stochastic_depth"]["epoch"])
    assert skipped > 0
    # the training FLOPs are the whole model's less the blocks it did not compute (the gates cost no matmul)
    assert sd.flops == pytest.approx(base.flops - skipped, rel=1e-9)
    # so its budget-matched baseline is given those FLOPs, not the full model's
    matched = runs["baseline@stochastic_depth+rezero"]
    assert matched.params["budget"]["unit"] == "flops" and matched.params["budget"]["amount"] == sd.flops
    assert sd.telemetry["meta"]["residual_gates"]["gates"] == sum(RESNET_STAGES)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_stochastic_depth_trains_under_ddp_with_the_same_blocks_on_every_rank():
    """2 processes at batch 32 drop the blocks 1 process at batch 64 drops: the draws depend on the seed and the
    step only, so the FLOPs skipped, summed over the ranks, are the single process's; DDP is told about the
    dropped blocks' unused parameters (without it the second step fails)."""
    runs = {}
    for nproc, bs in ((1, 64), (2, 32)):
        c = bench.run("digits", ["stochastic_depth(final_keep=0.3)"], epochs=1, bs=bs, model="resnet", width=8,
                      progress=None, nproc=nproc)
        assert not c.failures, c.failures[0].message[-3000:]
        runs[nproc] = c.results[0]
    ran = runs[2].telemetry["records"]["stochastic_depth"]["epoch"][-1]["ran_blocks"]
    assert min(ran) < runs[2].steps  # some block was dropped in some step, and training went on
    assert runs[1].steps == runs[2].steps
    assert runs[2].flops == pytest.approx(runs[1].flops, rel=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_layer_freezing_trains_under_ddp_as_in_one_process():
    """Frozen layers get no gradient: under DDP without find_unused_parameters the all-reduce waits for them and
    the next step fails. 2 processes at batch 32 freeze the same layers at the same steps as 1 at batch 64."""
    runs = {}
    for nproc, bs in ((1, 64), (2, 32)):
        c = bench.run("digits", ["layer_freezing(start=0.0, end=0.6)"], epochs=2, bs=bs, progress=None, nproc=nproc)
        assert not c.failures, c.failures[0].message[-3000:]
        runs[nproc] = c.results[0]
    timelines = {n: [(r["layer"], r["step"]) for r in run.telemetry["records"]["freezing"]["timeline"]]
                 for n, run in runs.items()}
    assert len(timelines[1]) >= 2 and timelines[2] == timelines[1]
    assert runs[2].steps == runs[1].steps
    assert runs[2].flops == pytest.approx(runs[1].flops, rel=1e-9) and runs[2].flops < runs[1].steps * 1e12


def test_training_flops_of_activation_checkpointing_count_the_recompute(images):
    """The meta-device count keeps the meta parameters through the backward, where checkpointing recomputes its
    blocks' forwards (it used to fail there, leaving the run's FLOPs unknown)."""
    from effilab.core.budget import step_flops
    from effilab.core.checkpointing import wrap_forward

    net = make_model(images, "resnet", width=8)
    x = torch.zeros(4, *images.input_shape)
    plain = step_flops(net, [x])
    for block in residual_blocks(net):
        wrap_forward(block)
    recomputed = step_flops(net, [x])
    assert plain < recomputed < 2 * plain  # one more forward of the blocks: about a third more
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_training_flops_of_the_freezing_cache_count_its_fills(images):
    """Filling the cache runs the frozen prefix outside the step the bench counts (the step runs the suffix on the
    stored outputs): the technique reports it (`flops_added`), so the cache saves FLOPs only where it re-reads."""
    args = "start=0.05, end=0.3"
    c = bench.run(images, [f"layer_freezing({args})", f"layer_freezing({args}, cache=True)"], epochs=4, bs=64,
                  model="cnn", width=8, progress=None)
    plain, cached = c.results
    epochs = cached.telemetry["records"]["freezing"]["epoch"]
    added = sum(e["flops_added"] for e in epochs)
    assert added > 0 and sum(e["prefix_samples_skipped"] for e in epochs) > 0
    counted = cached.telemetry["records"]["counter"]["epoch"][-1]["flops_total"]
    assert cached.flops == pytest.approx(counted + added, rel=1e-9)
    assert cached.flops < plain.flops
    # an epoch that filled the whole cache and re-read nothing costs what it costs without the cache
    fills = [i for i, e in enumerate(epochs) if e["flops_added"] and not e["prefix_samples_skipped"]]
    for i in fills:
        assert c.results[1].telemetry["records"]["counter"]["epoch"][i]["flops"] + epochs[i]["flops_added"] == \
            pytest.approx(plain.telemetry["records"]["counter"]["epoch"][i]["flops"], rel=1e-9)
