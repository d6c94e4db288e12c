from pathlib import Path

import pytest

from unpersonal.config import load_config
from unpersonal.errors import UserError


def test_presets_set_their_resolution_and_data_implies_cpu(tmp_path: Path) -> None:
    assert load_config().preset == "demo"
    assert load_config().data.resolution == 32
    gpu = load_config("gpu")
    assert (gpu.data.resolution, gpu.diffusion.space, gpu.autoencoder.factor) == (256, "latent", 8)
    with_data = load_config(data_source=tmp_path)
    assert with_data.preset == "cpu" and with_data.data.resolution == 32
    assert with_data.data.source == tmp_path.resolve()


def test_yaml_file_then_overrides_win_in_that_order(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("preset: gpu\nseed: 7\ndata:\n  resolution: 96\n  fit: pad\n")
    config = load_config(None, config_file, ["data.resolution=48", "phantoms.n_patients=10"])
    assert (config.preset, config.seed, config.data.fit) == ("gpu", 7, "pad")
    assert config.data.resolution == 48 and config.phantoms.n_patients == 10
    assert load_config("cpu", config_file).data.resolution == 96  # the file beats the preset


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config("cpu", None, ["data.split_fractions=[0.7, 0.15, 0.15]", "seed=3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml())
    assert load_config(None, saved) == config


@pytest.mark.parametrize("override, named", [
    ("data.resolutoin=32", "data.resolutoin"),
    ("dta.resolution=32", "dta"),
    ("data.resolution=big", "data.resolution"),
    ("data.split_fractions=[0.5, 0.5, 0.5]", "data.split_fractions"),
    ("data.fit=zoom", "data.fit"),
])
def test_bad_override_names_the_key(override: str, named: str) -> None:
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_config(None, None, [override])


def test_a_guidance_weight_a_labels_only_model_would_ignore_is_refused() -> None:
    """Told the labels alone and guided against them, the model draws from its labels at any
    weight: w = 0 (the cpu preset's) is kept, w = 2 is refused, guided against the empty
    condition it is class guidance."""
    labels_only = ["diffusion.conditioning=class"]
    assert load_config("cpu", None, labels_only).generate.guidance == 0.0
    with pytest.raises(UserError, match=r"generate\.guidance=2 would change nothing"):
        load_config("cpu", None, [*labels_only, "generate.guidance=2"])
    load_config("cpu", None, [*labels_only, "generate.guidance=2",
                              "sampling.guidance_against=empty"])


def test_typo_in_config_file_names_file_and_key(tmp_path: Path) -> None:
    config_file = tmp_path / "typo.yaml"
    config_file.write_text("data:\n  resoltion: 64\n")
    with pytest.raises(UserError, match=r"typo\.yaml.*unknown key 'data\.resoltion'"):
        load_config(None, config_file)


def test_unknown_preset_and_malformed_override_are_refused() -> None:
    with pytest.raises(UserError, match="unknown preset 'laptop'"):
        load_config("laptop")
    with pytest.raises(UserError, match="section.field=value"):
        load_config(None, None, ["resolution"])


def test_fields_added_later_enter_the_cache_key_only_off_their_default() -> None:
    """Runs made before `diffusion.space` (or the re-ID and generate options of later
    versions) existed keep their stages fresh; a run that sets one is keyed apart."""
    default = load_config("cpu").section_dump(("diffusion", "reid", "generate"))
    assert "space" not in default["diffusion"]
    assert "instance_share" not in default["reid"] and "copy_augment" not in default["reid"]
    assert "pseudo_condition" not in default["generate"]
    assert "steps" in default["diffusion"]  # every other field is keyed at any value
    latent = load_config("cpu", None, ["diffusion.space=latent", "reid.copy_augment.flip=false"])
    dumped = latent.section_dump(("diffusion", "reid"))
    assert dumped["diffusion"]["space"] == "latent"
    assert dumped["reid"]["copy_augment"]["flip"] is False


def test_the_cpu_128_preset_is_the_cpu_preset_in_latent_space_at_128_px() -> None:
    cpu, latent = load_config("cpu"), load_config("cpu-128")
    assert (latent.data.resolution, latent.diffusion.space) == (128, "latent")
    assert latent.diffusion.model_dump() == cpu.diffusion.model_copy(
        update={"space": "latent"}).model_dump()  # the same denoiser, on 32 px latents
    assert latent.generate == cpu.generate and latent.sampling == cpu.sampling
    assert (latent.embedder.input_size, latent.reid.input_size) == (32, 32)
