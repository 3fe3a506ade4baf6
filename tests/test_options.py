"""Typed catalog options: every adapter declares the options it takes, and a catalog entry's
options are checked against every adapter it lists -- a misspelt or mistyped one is an error
naming the model, the option and what is accepted, never silently ignored. No model is loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec
import pytest

from mofa_omni import cli
from mofa_omni.adapters import base
from mofa_omni.adapters.backends import create_adapter, resolved, select_adapter
from mofa_omni.adapters.base import adapter_class, check_options
from mofa_omni.adapters.options import AdapterOptions, decode_options
from mofa_omni.contract.errors import AdapterError
from mofa_omni.models.catalog import Catalog, CatalogError, variant_entry

PACKAGED = Catalog.load([])


@pytest.fixture()
def user_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's catalog file, found through $MOFA_OMNI_CATALOG (and no other user file)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = tmp_path / "catalog.toml"
    monkeypatch.setenv("MOFA_OMNI_CATALOG", str(path))
    return path


def test_a_misspelt_option_in_a_user_catalog_names_model_option_and_accepted(user_catalog,
                                                                                capsys):
    user_catalog.write_text(variant_entry("my-llm", "smollm2-135m",
                                          options={"dtype": "float32", "contxt": 8192}))
    catalog = Catalog.load()  # reading the catalog needs no adapter: it reads
    spec = catalog.get("my-llm")
    with pytest.raises(CatalogError) as raised:
        resolved(spec)  # what create_adapter, open_model and `omni models` go through
    message = str(raised.value)
    assert message.startswith("model 'my-llm': option 'contxt' is not an option of mlx_lm; "
                              "did you mean context? (accepted: file: str, ")
    assert "context: int >= 1, parallel: int >= 1, deterministic: bool, threads: int >= 1)" \
        in message
    for use in (lambda: create_adapter(spec, "llama.cpp"), lambda: select_adapter(spec)):
        with pytest.raises(CatalogError, match="option 'contxt' is not an option"):
            use()
    for name in spec.adapters:  # each adapter refuses it when made, whoever made it
        with pytest.raises(CatalogError, match=f"'contxt' is not an option of {name}"):
            adapter_class(name)(dataclasses.replace(spec, adapter=name))
    assert cli.main(["models"]) == 1  # `omni models` says so too
    assert "omni models: model 'my-llm': option 'contxt'" in capsys.readouterr().err


@pytest.mark.parametrize("model, options, message", [
    ("smollm2-135m", {"context": "big"}, "option context = 'big' is not an int >= 1"),
    ("smollm2-135m", {"context": 0}, "option context = 0 is not an int >= 1"),
    ("smollm2-135m", {"bits": 8.5}, "option bits = 8.5 is not an int >= 1"),
    ("smollm2-135m", {"dtype": "f32"}, "option dtype = 'f32' is not one of 'float32', "),
    ("whisper-tiny.en", {"compute_type": "int4"}, "option compute_type = 'int4' is not one of "),
    ("minilm-l6", {"max_length": "256"}, "option max_length = '256' is not an int >= 1"),
    ("piper-joe", {"speed": True}, r"option speed = True is not a float in \[0.25, 4.0\]"),
    ("flux2-klein-4b", {"guidance": "strong"}, "option guidance = 'strong' is not a float"),
])
def test_a_mistyped_value_names_the_option_and_its_type(model, options, message):
    spec = dataclasses.replace(PACKAGED.get(model), options=options)
    with pytest.raises(CatalogError, match=f"^model '{model}': {message}"):
        check_options(spec)


def test_a_mistyped_value_in_a_user_catalog_is_refused(user_catalog):
    user_catalog.write_text('[models.my-voice]\nadapter = "piper"\ntasks = ["speech_synthesis"]\n'
                            'format = "onnx"\nsource = { path = "voice" }\n'
                            'options = { speed = "fast" }\n')
    with pytest.raises(CatalogError, match=r"'my-voice': option speed = 'fast' is not a float"):
        create_adapter(Catalog.load().get("my-voice"))


@pytest.mark.parametrize("spec", PACKAGED.models.values(), ids=lambda spec: spec.name)
def test_every_packaged_entry_is_accepted_by_each_of_its_adapters(spec):
    for name in spec.adapters:
        options = decode_options(adapter_class(name).Options, spec.options, model=spec.name,
                                 adapter=name)
        assert {key: getattr(options, key) for key in spec.options} == spec.options


def test_sibling_adapters_take_each_others_options():
    # One entry lists both whisper adapters: compute_type is ct2_whisper's, and mlx_whisper
    # takes it too (documented as ct2_whisper's) -- not an error, and not lost either.
    whisper = dataclasses.replace(PACKAGED.get("whisper-tiny.en"),
                                  options={"compute_type": "float32"})
    check_options(whisper)
    assert create_adapter(whisper, "mlx").options.compute_type == "float32"
    assert create_adapter(whisper, "ctranslate2").options.compute_type == "float32"
    bert = dataclasses.replace(PACKAGED.get("minilm-l6"), options={"threads": 1, "batch_size": 4})
    assert create_adapter(bert, "mlx").batch_size == 4  # threads is ort_bert's
    assert create_adapter(bert, "onnxruntime").options.threads == 1


def test_an_adapter_with_no_options_refuses_any():
    vad = dataclasses.replace(PACKAGED.get("silero-vad"), options={"threshold": 0.5})
    expected = "model 'silero-vad': option 'threshold' is not an option of silero_vad " \
               r"\(it takes no options\)"
    with pytest.raises(CatalogError, match=expected):
        check_options(vad)
    with pytest.raises(CatalogError, match=expected):
        create_adapter(vad)
    assert base.ModelAdapter.Options is AdapterOptions  # a third-party adapter's default
    with pytest.raises(CatalogError, match=r"'x': option 'anything' is not an option of y"):
        decode_options(AdapterOptions, {"anything": 1}, model="x", adapter="y")


def test_options_come_typed_with_their_defaults_and_cannot_change():
    voice = create_adapter(dataclasses.replace(PACKAGED.get("piper-joe"), options={"speed": 2}))
    assert voice.options.speed == 2.0 and isinstance(voice.options.speed, float)  # TOML's 2
    assert voice.options.noise_scale is None  # unset: the voice's own
    llm = create_adapter(PACKAGED.get("smollm2-135m"), "mlx")
    assert (llm.options.context, llm.options.dtype, llm.options.file) == (4096, "float32", None)
    with pytest.raises(AttributeError):
        llm.options.context = 1


def test_an_adapter_that_cannot_be_imported_is_not_checked(monkeypatch):
    # An optional engine missing here must not make a model unusable through the others.
    real = base.adapter_class

    def without_ct2(name: str):
        if name.startswith("ct2_"):
            raise AdapterError(f"adapter {name!r} cannot be imported: No module named 'x'")
        return real(name)

    monkeypatch.setattr(base, "adapter_class", without_ct2)
    only_ct2 = dataclasses.replace(PACKAGED.get("smollm2-135m"), adapters=("ct2_lm",),
                                   options={"anything": 1})
    check_options(only_ct2)  # nothing here can say what it takes
    both = dataclasses.replace(PACKAGED.get("whisper-tiny.en"), options={"compute_typ": "int8"})
    with pytest.raises(CatalogError, match="not an option of mlx_whisper; did you mean "
                                           "compute_type"):
        check_options(both)  # the adapter that is here still checks


def test_options_that_are_not_a_table_are_refused_when_read(tmp_path: Path):
    user = tmp_path / "catalog.toml"
    user.write_text('[models.v]\nadapter = "piper"\ntasks = ["speech_synthesis"]\n'
                    'format = "onnx"\nsource = { path = "voice" }\noptions = 1.5\n')
    with pytest.raises(CatalogError, match="model 'v': options must be a table"):
        Catalog.load([user])


def test_every_adapter_declares_strict_options():
    from mofa_omni.adapters.base import adapter_names

    for name in adapter_names():
        options = adapter_class(name).Options
        assert issubclass(options, AdapterOptions), name
        assert options.__struct_config__.forbid_unknown_fields, name
        with pytest.raises(msgspec.ValidationError):  # keyword-only defaults, unknown refused
            msgspec.convert({"no_such_option": 1}, options)
