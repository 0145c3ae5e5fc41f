"""`milora eval --model file.gguf`: the generation loader and lm-eval's model read a GGUF file.

The file is written here with the `gguf` package the way llama.cpp's converter writes a llama checkpoint (its
q/k rows permuted, f32 tensors, a byte-level "gpt2" vocabulary), from the tiny llama and its tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval_harness import cli as eval_cli
from eval_harness import lm_eval_runner
from eval_harness.generation import load_causal_lm
from milora.cli import main as milora_main
from milora.tiny import SPECIAL_TOKENS, tiny_model, tiny_tokenizer

gguf = pytest.importorskip("gguf")

CONTROL, NORMAL = 3, 1  # llama.cpp's token types


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q/k projections (rotary halves interleaved per head)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The llama state dict under llama.cpp's tensor names."""
    config, state = model.config, model.state_dict()
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llama_cpp_permute(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = llama_cpp_permute(weight, config.num_key_value_heads)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weight
    return tensors


def write_tiny_gguf(path: Path, model, tokenizer) -> Path:
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if token in SPECIAL_TOKENS else NORMAL for token in tokens])
    writer.add_token_scores([0.0] * len(tokens))  # no merges: the vocabulary is bytes and specials
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    for name, tensor in gguf_tensors(model).items():
        writer.add_tensor(name, tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return tiny_model("llama").eval()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_llama, tiny_tokenizer())


def test_load_causal_lm_reads_the_gguf_weights_and_tokenizer(tiny_gguf, tiny_llama):
    model, tokenizer = load_causal_lm(str(tiny_gguf), device="cpu", dtype="float32")
    text = "Janet has 3 eggs. How many?"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == tiny_tokenizer()(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    with torch.no_grad():
        expected = tiny_llama(ids).logits.double()
        logits = model(ids).logits.double()
    assert float((logits - expected).norm() / expected.norm()) < 1e-5  # same weights, q/k rows restored


def test_lm_eval_model_of_a_gguf_file_scores_like_the_model(tiny_gguf, tiny_llama):
    lm = lm_eval_runner.build_lm(str(tiny_gguf), device="cpu", batch_size=2, dtype="float32")
    context, continuation = "Question: 2+2?\nAnswer:", " 4"
    [(loglikelihood, _)] = lm.loglikelihood([_request(context, continuation)])
    tokenizer = tiny_tokenizer()
    context_ids, full_ids = tokenizer(context).input_ids, tokenizer(context + continuation).input_ids
    with torch.no_grad():
        log_probs = tiny_llama(torch.tensor([full_ids])).logits[0].double().log_softmax(-1)
    expected = sum(log_probs[i - 1, full_ids[i]] for i in range(len(context_ids), len(full_ids)))
    assert loglikelihood == pytest.approx(float(expected), abs=1e-4)


def _request(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def test_milora_eval_runs_the_gsm8k_suite_on_a_gguf_file(tiny_gguf, tmp_path, shared_data_dir):
    out = tmp_path / "gsm8k"
    status = milora_main(["eval", "--suite", "gsm8k", "--model", str(tiny_gguf), "--output_dir", str(out),
                          "--data_dir", str(shared_data_dir), "--limit", "2", "--max_gen_toks", "4",
                          "--batch_size", "2", "--device", "cpu"])
    assert status == eval_cli.EXIT_OK
    report = json.loads((out / "results.json").read_text())
    assert report["model"] == str(tiny_gguf) and report["skipped"] == {}
    assert report["metrics"]["milora_gsm8k"]["n"] == 2
