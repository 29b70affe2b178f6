"""The few-step samplers (issue 24): "euler" and "euler-ancestral" at trailing timesteps, "lcm" and
"tcd" at LCM's timesteps, and explicit timesteps, each held against diffusers' scheduler of the same
name over a whole sampling run: diffusers' StableDiffusionXLPipeline with that scheduler and our
pipeline with the same tiny UNet, text encoders, starting latents and noise, in float64 (our steps
run in float32, as in every run; so do diffusers' Euler steps). Then guidance <= 1 as one UNet pass,
and the --timesteps and --timestep-spacing options from the command line to the pipeline.
"""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd

import evaluate
import pipeline as pipeline_module
import sample
from endless import load_state, state_path
from scheduler import (TCD_GAMMA, TIMESTEP_SPACINGS, SchedulerConfig, consistency_scalings, make_schedule, vp_coefficients,
                       with_sampler)
from tiny_pipeline import diffusers_tiny_pipeline, ours_from_diffusers
from training.validation import shapes_metrics
from video_settings import SPACING_NAMES, Settings, check_settings, parse_timesteps, settings_from_dict

REPOSITORY = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 64, 48  # latents 8 x 6
PROMPT = "a red circle moving left"
TOLERANCE = 1e-5
# Our sampler and timestep spacing, and diffusers' scheduler of the same name as its users set it up.
SETUPS = {
    "euler": ("euler", "trailing", EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),  # SDXL-Lightning
    "euler-ancestral": ("euler-ancestral", "trailing", EulerAncestralDiscreteScheduler,
                        {"timestep_spacing": "trailing"}),  # SDXL-Turbo
    "lcm": ("lcm", None, LCMScheduler, {}),  # LCM-LoRA: LCM's own timesteps
    "tcd": ("tcd", None, TCDScheduler, {}),  # Hyper-SD, TCD: LCM's timesteps, gamma 0.3
}
NOISE_MODULES = (scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """(diffusers' tiny SDXL pipeline, ours with its weights), both in float64, per prediction type."""
    folder = tmp_path_factory.mktemp("tokenizer")
    built = {}
    for prediction_type in ("epsilon", "v_prediction"):
        config = dataclasses.replace(SchedulerConfig.sdxl_base(), prediction_type=prediction_type)
        reference = diffusers_tiny_pipeline(folder, config).to(dtype=torch.float64)
        built[prediction_type] = reference, ours_from_diffusers(reference, config).to(dtype=torch.float64)
    return built


@pytest.fixture
def float32_noise(monkeypatch):
    """diffusers' schedulers draw their noise as our pipeline does: in float32 from the generator, then
    cast (in float64 they would draw other numbers)."""
    def draw(shape, generator=None, device=None, dtype=None, **_):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)

    for module in NOISE_MODULES:
        monkeypatch.setattr(module, "randn_tensor", draw)


def assert_close(ours, theirs):
    """Within TOLERANCE of the latents' scale: a random UNet predicting the noise makes latents of
    up to about 70 (the clean estimate divides by alpha_t, 0.07 at the top), and our steps run in
    float32 (measured: at most 4.4e-7 of the scale)."""
    assert (ours - theirs).abs().max() <= TOLERANCE * max(1.0, theirs.abs().max().item())


def run_both(pipelines, setup, guidance, steps=None, timesteps=None, prediction_type="epsilon", negative=None):
    """The final latents of a whole run (ours, diffusers'), each (1, 4, h, w), from the same starting
    latents and noise generator, `steps` steps or at explicit `timesteps`."""
    reference, ours = pipelines[prediction_type]
    sampler, spacing, oracle, options = SETUPS[setup]
    latents = torch.randn(1, 4, 1, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours_latents = ours(PROMPT, negative, HEIGHT, WIDTH, num_frames=1, num_inference_steps=steps, guidance_scale=guidance,
                        latents=latents, generator=torch.Generator().manual_seed(7), output_type="latent",
                        sampler=sampler, timestep_spacing=spacing, timesteps=timesteps)
    reference.scheduler = oracle.from_config(ours.scheduler_config.to_dict(), **options)
    if timesteps is None:
        reference.scheduler.set_timesteps(steps)
    else:
        reference.scheduler.set_timesteps(timesteps=timesteps)
    start = latents[:, :, 0]  # (1, 4, h, w)
    if setup.startswith("euler"):  # diffusers' x = sample / alpha, which its pipeline scales by init_noise_sigma
        alpha, _ = vp_coefficients(float(reference.scheduler.sigmas[0]))
        start = start / alpha / reference.scheduler.init_noise_sigma
    their_latents = reference(
        PROMPT, negative_prompt=negative, height=HEIGHT, width=WIDTH, num_inference_steps=steps, timesteps=timesteps,
        guidance_scale=guidance, latents=start, generator=torch.Generator().manual_seed(7), output_type="latent",
        **({"eta": TCD_GAMMA} if setup == "tcd" else {}),  # diffusers' pipelines pass eta 0 otherwise
    ).images
    return ours_latents[:, :, 0], their_latents


@pytest.mark.parametrize("guidance", [0.0, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_whole_run_equals_diffusers(pipelines, float32_noise, setup, steps, guidance):
    # euler 4 steps: SDXL-Lightning's setup; euler-ancestral 1 step: SDXL-Turbo's; lcm 4; tcd 4 (gamma 0.3).
    assert_close(*run_both(pipelines, setup, guidance, steps))


@pytest.mark.parametrize("guidance", [0.0, 1.0])
@pytest.mark.parametrize("setup, timesteps", [
    ("lcm", [999, 749, 499, 249]),  # DMD2's
    ("lcm", [800]),  # one step from below the top
    ("lcm", [999, 499, 3, 1]),  # down where LCM's boundary scalings matter: c_skip 0.0025 at timestep 1
    ("tcd", [999, 749, 499, 249]),
    ("euler", [999, 845, 500, 100]),
])
def test_explicit_timesteps_equal_diffusers(pipelines, float32_noise, setup, timesteps, guidance):
    assert_close(*run_both(pipelines, setup, guidance, timesteps=timesteps))


@pytest.mark.parametrize("setup", ["lcm", "tcd"])
def test_lcm_and_tcd_with_v_prediction_and_with_guidance_equal_diffusers(pipelines, float32_noise, setup):
    assert_close(*run_both(pipelines, setup, 0.0, 4, prediction_type="v_prediction"))
    assert_close(*run_both(pipelines, setup, 1.5, 4, negative="blue square"))  # LCM-LoRA's guidance 1 to 2


def test_lcm_boundary_scalings_equal_diffusers():
    oracle = LCMScheduler()
    for timestep in (0, 1, 3, 19, 259, 999):
        assert consistency_scalings(timestep) == pytest.approx(
            oracle.get_scalings_for_boundary_condition_discrete(timestep), rel=1e-12, abs=1e-15)
    assert consistency_scalings(0) == (1.0, 0.0)  # at timestep 0 the sample itself


# Timesteps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("oracle", [LCMScheduler, TCDScheduler])
def test_lcm_spacing_equals_diffusers_for_every_step_count(oracle):
    config = with_sampler(SchedulerConfig.sdxl_base(), "lcm")
    theirs = oracle.from_config(SchedulerConfig.sdxl_base().to_dict())
    for steps in range(1, 51):
        theirs.set_timesteps(steps)
        timesteps, _ = make_schedule(config, steps)
        assert torch.equal(timesteps, theirs.timesteps)
    with pytest.raises(ValueError, match="at most 50 steps"):
        make_schedule(config, 51)  # diffusers refuses it too
    with pytest.raises(ValueError):
        theirs.set_timesteps(51)


def test_explicit_timesteps_have_diffusers_sigmas():
    config = SchedulerConfig.sdxl_base()
    for timesteps in ([999, 749, 499, 249], [800], [999, 845, 500, 100, 0]):
        theirs = EulerDiscreteScheduler.from_config(config.to_dict())
        theirs.set_timesteps(timesteps=timesteps)
        ours_timesteps, sigmas = make_schedule(config, timesteps=timesteps)
        assert ours_timesteps.tolist() == timesteps and torch.equal(sigmas, theirs.sigmas)


@pytest.mark.parametrize("timesteps", [[], [999, 999], [249, 499], [-1], [1000], [999.0], [True]])
def test_bad_explicit_timesteps_raise(timesteps):
    with pytest.raises(ValueError, match="timesteps must be distinct ints in \\[0, 1000\\)"):
        make_schedule(SchedulerConfig(), timesteps=timesteps)


def test_a_schedule_takes_a_step_count_or_timesteps():
    with pytest.raises(ValueError, match="not both"):
        make_schedule(SchedulerConfig(), 4, [999, 499])
    with pytest.raises(ValueError, match="not both"):
        make_schedule(SchedulerConfig())


def test_lcm_and_tcd_take_their_own_spacing_unless_one_is_named():
    assert SPACING_NAMES == TIMESTEP_SPACINGS  # --timestep-spacing lists them without importing torch
    config = SchedulerConfig.video_model()  # trailing
    assert with_sampler(config, "lcm").timestep_spacing == with_sampler(config, "tcd").timestep_spacing == "lcm"
    assert with_sampler(config, "euler").timestep_spacing == "trailing"
    assert with_sampler(config, "lcm", "trailing").timestep_spacing == "trailing"
    assert with_sampler(config, None, "leading") == dataclasses.replace(config, timestep_spacing="leading")
    assert with_sampler(config, None, None) is config


# Guidance <= 1 is a single UNet pass --------------------------------------------------------------


def test_guidance_at_most_one_is_one_unet_pass_without_negatives(pipelines, monkeypatch):
    _, ours = pipelines["epsilon"]
    batches, unet_forward = [], ours.unet.forward

    def counted(sample, timestep, text, *arguments, **options):
        assert text.shape[0] == sample.shape[0]  # the prompts, and their negatives only under guidance
        batches.append(sample.shape[0])
        return unet_forward(sample, timestep, text, *arguments, **options)

    monkeypatch.setattr(ours.unet, "forward", counted)
    for guidance, batch in ((0.0, 2), (1.0, 2), (2.0, 4)):
        batches.clear()
        ours([PROMPT, "a blue square"], None, HEIGHT, WIDTH, num_frames=2, num_inference_steps=4, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(0), output_type="latent", sampler="lcm")
        assert batches == [batch] * 4, guidance  # one call per step; the batch doubled only for guidance > 1


# The options: --timesteps and --timestep-spacing --------------------------------------------------

HOSTILE_TIMESTEPS = ["", " ", "999,999", "-1", "999,-5", "1000", "a", "249,499", "999,,499", "1e3", "0x10", "999;749",
                     "999.0", "+999", "９９９"]
FAST = ["--frames", "2", "--context-frames", "1", "--height", "32", "--width", "48"]


def test_a_timestep_of_thousands_of_digits_is_refused_in_one_short_line(tmp_path):
    value = "9" * 5000  # int() alone refuses it, without naming the option
    with pytest.raises(ValueError, match=r"^--timesteps '9{77}\.\.\.': 9{20}\.\.\. is too large") as refused:
        sample.main(["--prompt", "a", "--timesteps", value, "--out", str(tmp_path / "video.mp4")])
    assert len(str(refused.value)) < 300


@pytest.mark.parametrize("value", HOSTILE_TIMESTEPS)
def test_hostile_timesteps_are_refused_in_one_line_before_any_work(model, tmp_path, value):
    with pytest.raises(ValueError, match=f"^--timesteps {re.escape(repr(value))}: ") as refused:
        sample.main(["--model", str(model), "--prompt", "a", "--timesteps", value, "--out", str(tmp_path / "video.mp4")])
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="^--timesteps "):
        evaluate.main(["--model", str(model), "--timesteps", value, "--chunks", "1"])


def test_timestep_options_answer_without_torch():
    probe = ("import sys, sample\ntry:\n    sample.main({argv!r})\nexcept SystemExit:\n    pass\n"
             "except ValueError as error:\n    print('error:', error)\nprint('torch imported:', 'torch' in sys.modules)")
    for argv in (["--prompt", "a", "--timesteps", "999,999"], ["--prompt", "a", "--timesteps", "a"]):
        result = subprocess.run([sys.executable, "-c", probe.format(argv=argv)], cwd=REPOSITORY, capture_output=True,
                                text=True, check=True)
        assert result.stdout.startswith("error: --timesteps ") and result.stdout.endswith("torch imported: False\n")
    result = subprocess.run([sys.executable, "sample.py", "--prompt", "a", "--timestep-spacing", "karras"],
                            cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--timestep-spacing" in result.stderr


def test_timesteps_parse_and_override_the_steps():
    assert parse_timesteps(" 999, 749,499 ,249") == [999, 749, 499, 249]
    settings = Settings(timeline=[(0, "a")], steps=25, timesteps="999,749,499,249")
    check_settings(settings)
    assert settings.steps == 4 and settings.chunk.timestep_list == [999, 749, 499, 249]
    assert Settings(timeline=[(0, "a")]).chunk.timestep_list is None


def test_a_state_file_from_before_the_timestep_options_has_neither(tmp_path):
    values = dataclasses.asdict(Settings(timeline=[(0, "a")]))
    del values["timesteps"], values["timestep_spacing"]
    settings = settings_from_dict(values)
    assert settings.timesteps is None and settings.timestep_spacing is None


@pytest.fixture
def schedules(monkeypatch):
    """Every schedule the pipeline makes: (sampler, spacing, timesteps)."""
    made, make = [], pipeline_module.make_schedule

    def recorded(config, *arguments):
        timesteps, sigmas = make(config, *arguments)
        made.append((config.algorithm_type, config.timestep_spacing, timesteps.tolist()))
        return timesteps, sigmas

    monkeypatch.setattr(pipeline_module, "make_schedule", recorded)
    return made


def test_sample_evaluate_and_validation_sample_at_the_chunk_options(model, pipeline, tmp_path, schedules):
    sample.main(["--model", str(model), "--prompt", PROMPT, *FAST, "--chunks", "2", "--scheduler", "lcm",
                 "--timesteps", "999,499", "--out", str(tmp_path / "a.gif")])
    assert schedules == [("lcm", "lcm", [999, 499])] * 2
    schedules.clear()
    sample.main(["--model", str(model), "--prompt", PROMPT, *FAST, "--chunks", "1", "--scheduler", "euler", "--steps", "3",
                 "--timestep-spacing", "linspace", "--out", str(tmp_path / "b.gif")])
    assert schedules == [("euler", "linspace", [999, 666, 333])]
    schedules.clear()
    sample.main(["--model", str(model), "--prompt", PROMPT, *FAST, "--chunks", "1", "--scheduler", "tcd", "--steps", "4",
                 "--out", str(tmp_path / "c.gif")])
    assert schedules == [("tcd", "lcm", [999, 759, 499, 259])]  # TCD's own timesteps
    schedules.clear()
    evaluate.main(["--model", str(model), "--prompts", PROMPT, "--seeds", "1", *FAST, "--chunks", "2",
                   "--scheduler", "tcd", "--timesteps", "999,749,499,249"])
    assert schedules == [("tcd", "lcm", [999, 749, 499, 249])] * 2
    schedules.clear()
    defaults = {"frames": 2, "context_frames": 1, "height": 32, "width": 48, "guidance": 1.0, "scheduler": "lcm",
                "timestep_spacing": "trailing", "steps": 2}
    shapes_metrics(pipeline, defaults, prompts=[PROMPT], chunks=2)
    assert schedules == [("lcm", "trailing", [999, 499])] * 2
    schedules.clear()
    shapes_metrics(pipeline, {**defaults, "timesteps": "999,249"}, prompts=[PROMPT], chunks=1)
    assert schedules == [("lcm", "trailing", [999, 249])]


def test_resume_keeps_the_timesteps_and_equals_an_uninterrupted_run(model, tmp_path):
    arguments = ["--model", str(model), "--prompt", PROMPT, *FAST, "--scheduler", "lcm", "--timesteps", "999,499",
                 "--timestep-spacing", "trailing"]
    resumed, uninterrupted = tmp_path / "resumed", tmp_path / "uninterrupted"
    sample.main([*arguments, "--chunks", "1", "--out", str(resumed)])
    settings, _, _ = load_state(state_path(str(resumed)))
    assert (settings.timesteps, settings.steps, settings.timestep_spacing) == ("999,499", 2, "trailing")
    with pytest.raises(ValueError, match="differ from it: --timesteps 999,500 "):
        sample.main(["--out", str(resumed), "--resume", "--chunks", "2", "--timesteps", "999,500"])
    sample.main(["--out", str(resumed), "--resume", "--chunks", "2"])
    sample.main([*arguments, "--chunks", "2", "--out", str(uninterrupted)])
    frames = lambda folder: {path.name: path.read_bytes() for path in sorted(folder.iterdir())}
    assert len(frames(resumed)) == 4 and frames(resumed) == frames(uninterrupted)
