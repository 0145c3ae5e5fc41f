"""`milora.model_source`: what a model argument names, decided once and handed to the loaders."""

import pytest
import torch

from milora.loading import is_vision_language, load_model, load_processing_class
from milora.model_source import GGUF, HUB, LOCAL, TINY, ModelSource, model_source
from milora.tiny import tiny_model, tiny_processor


@pytest.mark.parametrize("name,kind", [
    ("tiny:llama", TINY), ("tiny:llava", TINY), ("models/x.Q4_1.gguf", GGUF), ("/abs/model.GGUF", GGUF),
    ("meta-llama/Llama-2-7b-hf", HUB), ("./outputs/run/merged", LOCAL), ("/no/such/dir", LOCAL), ("gpt2", LOCAL),
])
def test_the_kind_of_a_model_argument(name, kind):
    assert model_source(name) == ModelSource(name, kind)
    assert model_source(model_source(name)) is not None and str(model_source(name)) == name


def test_the_vision_language_check_reads_the_config_once(tmp_path):
    llava_dir = tmp_path / "llava"
    tiny_model("llava").save_pretrained(llava_dir)
    tiny_processor().save_pretrained(llava_dir)
    source = model_source(str(llava_dir))
    assert source.kind == LOCAL and source.vision_language and is_vision_language(source)
    (llava_dir / "config.json").rename(tmp_path / "config.json")  # a second read would now fail
    assert source.vision_language and source.model_type == "llava"
    (tmp_path / "config.json").rename(llava_dir / "config.json")
    model = load_model(source, dtype="float32")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(load_processing_class(source)).__name__ == "LlavaProcessor"
    assert not model_source("tiny:llama").vision_language and model_source("tiny:llava").vision_language


def test_a_source_loads_the_same_model_as_its_name(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    by_name = load_model(str(tmp_path / "llama"), dtype="float32")
    by_source = load_model(model_source(str(tmp_path / "llama")), dtype="float32")
    for (name, a), (_, b) in zip(by_name.state_dict().items(), by_source.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_missing_local_model_is_named():
    with pytest.raises(FileNotFoundError, match="'gpt2' is neither a local directory nor a hub id"):
        load_model(model_source("gpt2"))


def test_gguf_does_not_import_the_loaders():
    """`milora.loading` imports `milora.gguf` (through `milora.model_source` too); the reverse import is gone."""
    import milora.gguf
    import milora.loading
    import milora.model_source
    from tests.conftest import imported_modules

    assert "milora.gguf" in imported_modules(milora.loading.__file__)
    assert "milora.gguf" in imported_modules(milora.model_source.__file__)
    assert not {"milora.loading", "milora.model_source"} & imported_modules(milora.gguf.__file__)
