"""Which files `ember pull` fetches for REPO, REPO:QUANT and --file; how model names parse (offline)."""

from __future__ import annotations

import pytest

from ember.errors import EmberError
from ember.hub_selection import SelectionError, quant_of, select_files
from ember.model_store import find_pulled_model, parse_model_name, resolve_pulled_model, write_manifest

GGUF_REPO = [
    "README.md",
    "Qwen3-0.6B-Q4_K_M.gguf",
    "Qwen3-0.6B-Q8_0.gguf",
    "Qwen3-0.6B-UD-Q4_K_XL.gguf",
    "Qwen3-0.6B-BF16.gguf",
    "mmproj-F16.gguf",
]
FOLDER_REPO = [
    "README.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "onnx/model.onnx",
    "pytorch_model.bin",
]


@pytest.mark.parametrize(
    ("file_name", "quant"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("Qwen3-0.6B-Q4_K_M.gguf", "Q4_K_M"),
        ("Qwen3-0.6B-UD-Q4_K_XL.gguf", "Q4_K_XL"),
        ("gemma-3-270m-it-qat-IQ4_XS.gguf", "IQ4_XS"),
        ("model_q8_0.gguf", "Q8_0"),
        ("sub/dir/Llama-3.2-1B-Instruct-f16.gguf", "F16"),
        ("big-Q4_K_M-00001-of-00003.gguf", "Q4_K_M"),
        ("plain.gguf", None),
    ],
)
def test_quant_of_reads_the_quantization_from_the_file_name(file_name, quant):
    assert quant_of(file_name) == quant


def test_repo_quant_picks_exactly_that_file():
    selection = select_files("org/qwen", GGUF_REPO, "q4_k_m", None)
    assert (selection.tag, selection.files, selection.load) == (
        "Q4_K_M",
        ["Qwen3-0.6B-Q4_K_M.gguf"],
        "Qwen3-0.6B-Q4_K_M.gguf",
    )
    assert select_files("org/qwen", GGUF_REPO, "Q4_K_XL", None).files == ["Qwen3-0.6B-UD-Q4_K_XL.gguf"]


def test_unknown_quant_lists_the_choices():
    with pytest.raises(SelectionError) as error:
        select_files("org/qwen", GGUF_REPO, "Q2_K", None)
    assert str(error.value) == (
        "org/qwen has no GGUF file in Q2_K; choose one of: "
        "org/qwen:BF16, org/qwen:Q4_K_M, org/qwen:Q4_K_XL, org/qwen:Q8_0"
    )


def test_repo_alone_defaults_to_q4_k_m_among_several_ggufs_and_says_so():
    selection = select_files("org/qwen", GGUF_REPO, None, None)
    assert selection.files == ["Qwen3-0.6B-Q4_K_M.gguf"]
    assert selection.note.startswith("picked Q4_K_M (also available: BF16, Q4_K_XL, Q8_0")
    without_default = [name for name in GGUF_REPO if "Q4_K_M" not in name]
    with pytest.raises(SelectionError, match="several GGUF files; choose one of"):
        select_files("org/qwen", without_default, None, None)


def test_repo_alone_takes_the_safetensors_folder_with_its_config_and_tokenizer():
    selection = select_files("org/llama", FOLDER_REPO, None, None)
    assert selection.tag == "safetensors" and selection.load == ""
    assert set(selection.files) == {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }


def test_file_pattern_selects_one_gguf_or_fails_clearly():
    assert select_files("org/qwen", GGUF_REPO, None, "*q8_0*").files == ["Qwen3-0.6B-Q8_0.gguf"]
    with pytest.raises(SelectionError, match="matches several GGUF files"):
        select_files("org/qwen", GGUF_REPO, None, "*Q4_K*")
    with pytest.raises(SelectionError, match="no file of org/qwen matches"):
        select_files("org/qwen", GGUF_REPO, None, "*.bin")
    with pytest.raises(SelectionError, match="not both"):
        select_files("org/qwen", GGUF_REPO, "Q8_0", "*Q8_0*")


def test_repositories_ember_cannot_read_are_refused():
    with pytest.raises(SelectionError, match="neither GGUF files nor safetensors"):
        select_files("org/old", ["config.json", "pytorch_model.bin", "tokenizer.json"], None, None)
    with pytest.raises(SelectionError, match="split into parts"):
        select_files(
            "org/big", ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"], "Q4_K_M", None
        )
    with pytest.raises(SelectionError, match="no tokenizer"):
        select_files("org/notok", ["config.json", "model.safetensors"], None, None)


@pytest.mark.parametrize(
    "text", ["smollm2", "../x", "a/b/c", "org/repo:", "org/repo:../x", "/abs/path", "org/..:Q4"]
)
def test_malformed_names_are_refused(text):
    if text == "org/repo:":
        assert parse_model_name(text) == ("org/repo", None)
        return
    with pytest.raises(EmberError):
        parse_model_name(text)


def test_lookup_by_name_tag_and_only_variant(tmp_path):
    for repo, tag, load in (
        ("org/qwen", "Q4_K_M", "q.gguf"),
        ("org/qwen", "Q8_0", "q8.gguf"),
        ("org/story", "safetensors", ""),
    ):
        directory = tmp_path / repo / tag
        directory.mkdir(parents=True)
        write_manifest(directory, {"repo_id": repo, "revision": "abc", "load": load})
    assert find_pulled_model("org/qwen:q8_0", tmp_path) == tmp_path / "org/qwen/Q8_0/q8.gguf"
    assert find_pulled_model("org/story", tmp_path) == tmp_path / "org/story/safetensors"
    assert find_pulled_model("org/never-pulled", tmp_path) is None  # the loader reports the missing path
    assert find_pulled_model("not a name", tmp_path) is None
    with pytest.raises(EmberError, match="several pulled variants; name one: org/qwen:Q4_K_M, org/qwen:Q8_0"):
        find_pulled_model("org/qwen", tmp_path)
    with pytest.raises(EmberError, match=r"no pulled model named 'org/qwen:Q2_K' \(pulled: "):
        resolve_pulled_model("org/qwen:Q2_K", tmp_path)
    # A folder without its manifest (a pull that never finished) is not a model.
    (tmp_path / "org/half/Q4_0").mkdir(parents=True)
    assert find_pulled_model("org/half", tmp_path) is None
