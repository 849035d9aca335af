"""Story batches on ComfyUI's own models: a tiny SD1.5 file read by ComfyUI's
CheckpointLoaderSimple and sampled by ComfyUI's sampler gives the same panels as the pack's
reference pipeline (diffusers models from the same file, diffusers' DDIM)."""
import pytest
import torch

import tiny_models
from kinema.nodes import story as story_nodes
from kinema.pipelines import story as story_pipeline

STORY = "[Ann] a girl with a red scarf\n[Ann] the girl in a garden\n[NC] a quiet street\n[Ann] the girl reading"


@pytest.fixture(scope="module")
def reference(models_dir, tiny_sd15):
    return story_pipeline.load_checkpoint(models_dir / "checkpoints" / tiny_sd15, dtype=torch.float32,
                              configs=tiny_models.sd15_diffusers_configs())


@pytest.mark.parametrize("freeu, cfg, schedule", [(False, 5.0, "lowvram"), (True, 4.0, "app"), (False, 1.0, "lowvram")])
def test_core_route_matches_reference(sd15_core, reference, freeu, cfg, schedule):
    model, clip, vae = sd15_core
    story = story_pipeline.parse_story(STORY, id_length=2)
    settings = story_pipeline.StorySettings(width=32, height=48, steps=6, cfg=cfg, seed=11, batch_size=1,
                                freeu=freeu, schedule=schedule, negative="blurry")
    got = story_pipeline.generate_story_comfy(model, clip, vae, story, settings, story_pipeline.comfy_arch(model))
    want = story_pipeline.generate_story(reference, story, settings)
    assert got.shape == want.shape == (4, 48, 32, 3)
    # same weights, two implementations (ComfyUI's LDM modules and sampler, diffusers' models and
    # DDIM) in float32: they agree to rounding; the panels themselves differ from each other
    assert (got - want).abs().max() < 2e-3
    assert (want[0] - want[1]).abs().max() > 0.05


def test_story_batch_node(sd15_core):
    model, clip, vae = sd15_core
    node = story_nodes.KinemaStoryBatch()
    images, captions = node.generate(model, clip, vae, STORY + " #reading time", "", 2, "{prompt}", "", 32, 32, 2,
                                     5.0, 3, 0.5, 0.5, 2, True, "lowvram")
    assert images.shape == (4, 32, 32, 3) and captions.splitlines()[-1] == "reading time"
    again, _ = node.generate(model, clip, vae, STORY + " #reading time", "", 2, "{prompt}", "", 32, 32, 2, 5.0, 3,
                             0.5, 0.5, 2, True, "lowvram")
    assert torch.equal(images, again)
    with pytest.raises(ValueError, match="width: 40 is not a positive multiple of 16"):
        node.generate(model, clip, vae, STORY, "", 2, "{prompt}", "", 40, 32, 2, 5.0, 3, 0.5, 0.5, 2, True, "lowvram")


def test_ksampler_patch_route_agrees_with_the_story_batch(sd15_core):
    """The whole story as one latent batch under ComfyUI's sampler with 'Consistent Attention
    Patch' (the KSampler route) gives the same panels as the Story Batch node's phases (references
    first, banked; the others read the bank): same noise, sigmas and conditioning."""
    import comfy.sample
    import comfy.samplers
    from kinema.pipelines.ddim import ddim_sigmas

    model, clip, vae = sd15_core
    story = story_pipeline.parse_story(STORY, id_length=2)
    settings = story_pipeline.StorySettings(width=32, height=32, steps=3, cfg=4.0, seed=5, batch_size=1,
                                freeu=False, negative="blurry")
    phased = story_pipeline.generate_story_comfy(model, clip, vae, story, settings, "sd15")

    (patched,) = story_nodes.KinemaConsistentAttentionPatch().patch(model, STORY, "", 2, 0.5, 0.5, 5, "lowvram")
    positive, negative = story_pipeline.encode_story_prompts(clip, [p.prompt for p in story.panels], "blurry")
    sigmas = ddim_sigmas(model.get_model_object("model_sampling").sigmas, 3, story_pipeline.read_config("sd15", "scheduler"))
    s0 = float(sigmas[0])
    noise = torch.cat([torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5 + p)) for p in range(4)])
    noise = noise * (1 + s0 * s0) ** 0.5 / s0   # DDIM's start, as the Story Batch node makes it
    latent = comfy.sample.sample_custom(patched, noise, 4.0, comfy.samplers.sampler_object("euler"), sigmas,
                                        positive, negative, torch.zeros_like(noise), disable_pbar=True, seed=5)
    whole = vae.decode(latent / (1 + float(sigmas[-1]) ** 2) ** 0.5).float().clamp(0, 1)
    assert (whole - phased).abs().max() < 2e-3
