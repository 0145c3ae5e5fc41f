"""Forgetting loss on real tiny models: zero for identical models, equal to a float64 hand computation
otherwise, independent of batching and padding; corpus reading and token blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from milora.analysis import forgetting
from milora.loading import load_model
from milora.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def blocks(text_file):
    # 5 blocks of 48 tokens: with batch_size 2 the last batch holds one block, and the last block is short.
    return forgetting.token_blocks(forgetting.iter_texts(str(text_file)), tiny_tokenizer(), 48, 5)[:4] + [
        forgetting.token_blocks(["a short tail"], tiny_tokenizer(), 48, 1)[0]]


def hand_forgetting(base_model, tuned_model, blocks):
    """Mean KL, CE, H over all positions, one unpadded block at a time, textbook float64 formulas."""
    kl, ce, entropy, count = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for block in blocks:
            ids = torch.tensor([block])
            log_p = torch.log_softmax(base_model(input_ids=ids).logits[0].double(), -1).numpy()
            log_q = torch.log_softmax(tuned_model(input_ids=ids).logits[0].double(), -1).numpy()
            p = np.exp(log_p)
            kl += float((p * (log_p - log_q)).sum())
            ce -= float((p * log_q).sum())
            entropy -= float((p * log_p).sum())
            count += len(block)
    return kl / count, ce / count, entropy / count, count


def test_identical_models_forget_nothing(base_dir, blocks):
    base = load_model(str(base_dir), dtype="float32").eval()
    same = load_model(str(base_dir), dtype="float32").eval()
    result = forgetting.forgetting_loss(base, same, blocks, batch_size=2, show_progress=False)
    assert result["forgetting_loss"] == 0.0
    assert result["cross_entropy"] == pytest.approx(result["base_entropy"], rel=1e-12)
    _, _, entropy, count = hand_forgetting(base, same, blocks)
    assert result["num_tokens"] == count == sum(len(b) for b in blocks)
    assert result["base_entropy"] == pytest.approx(entropy, rel=1e-6)
    assert result["base_lm_loss"] == result["tuned_lm_loss"]


def test_forgetting_matches_hand_computation_across_batch_sizes(base_dir, minor_tuned_dir, blocks):
    base = load_model(str(base_dir), dtype="float32").eval()
    tuned = load_model(str(minor_tuned_dir), dtype="float32").eval()
    kl, ce, entropy, count = hand_forgetting(base, tuned, blocks)
    assert kl > 1e-6  # the constructed update does change the predictions
    for batch_size in (1, 2, 8):  # 8 > number of blocks: one padded batch
        result = forgetting.forgetting_loss(base, tuned, blocks, batch_size=batch_size, show_progress=False)
        assert result["num_tokens"] == count
        # Padded batches change float32 matmul order, hence the loose relative tolerance on the tiny KL.
        assert result["forgetting_loss"] == pytest.approx(kl, rel=1e-3)
        assert result["cross_entropy"] == pytest.approx(ce, rel=1e-6)
        assert result["base_entropy"] == pytest.approx(entropy, rel=1e-6)
        assert result["cross_entropy"] - result["base_entropy"] == pytest.approx(result["forgetting_loss"], rel=1e-6)


def test_lm_losses_match_hand_computation(base_dir, blocks):
    base = load_model(str(base_dir), dtype="float32").eval()
    result = forgetting.forgetting_loss(base, base, blocks, batch_size=3, show_progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            log_q = torch.log_softmax(base(input_ids=torch.tensor([block])).logits[0].double(), -1)
            total -= float(log_q[torch.arange(len(block) - 1), torch.tensor(block[1:])].sum())
            count += len(block) - 1
    assert result["base_lm_loss"] == pytest.approx(total / count, rel=1e-6)


def test_pad_batches_keep_order_and_mask_the_padding():
    sequences = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]]
    batches = list(forgetting.pad_batches(sequences, batch_size=2, pad_id=0))
    assert [tuple(ids.shape) for ids, _ in batches] == [(2, 3), (2, 4), (1, 1)]
    ids, mask = batches[0]
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    unpadded = [row[: int(m.sum())] for ids, mask in batches for row, m in zip(ids.tolist(), mask, strict=True)]
    assert unpadded == sequences


def test_sequence_nll_counts_tokens_from_the_prompt_length_across_batch_sizes(base_dir):
    """Against HF's own loss, one unpadded sequence at a time with the prompt's labels masked; sequences of
    mixed lengths (so batches are padded), one whose completion is empty and one without a prompt."""
    model = load_model(str(base_dir), dtype="float32").eval()
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(5, 250, (length,), generator=generator).tolist() for length in (7, 19, 3, 12, 30, 5)]
    prompts = [3, 10, 3, 0, 29, 1]  # the third has no completion token; the fourth is all completion
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, prompt in zip(sequences, prompts, strict=True):
            counted = len(ids) - max(prompt, 1)
            if counted:
                labels = torch.tensor([[-100] * prompt + ids[prompt:]])
                loss = model(input_ids=torch.tensor([ids]), labels=labels).loss
                total, count = total + float(loss) * counted, count + counted
    for batch_size in (1, 4, 8):
        result = forgetting.sequence_nll(model, sequences, prompts, batch_size=batch_size, pad_id=0)
        assert result["token_count"] == count == 29
        assert result["nll"] == pytest.approx(total / count, rel=1e-6)
        assert result["nll_sum"] == pytest.approx(total, rel=1e-6)
    # without prompt lengths: every token after the first, as forgetting_loss's lm losses count them
    whole = forgetting.sequence_nll(model, sequences, batch_size=4)
    reference = forgetting.forgetting_loss(model, model, sequences, batch_size=4, show_progress=False)
    assert whole["token_count"] == sum(len(ids) - 1 for ids in sequences)
    assert whole["nll"] == pytest.approx(reference["base_lm_loss"], rel=1e-9)
    with pytest.raises(ValueError, match="no tokens to score"):
        forgetting.sequence_nll(model, [[5, 6]], [2])
    with pytest.raises(ValueError, match="1 prompt lengths for 2 sequences"):
        forgetting.sequence_nll(model, [[5, 6], [7, 8]], [1])


def test_token_blocks_concatenate_texts_and_start_with_bos():
    tokenizer = tiny_tokenizer()
    texts = ["first line\n", "", "second line\n", "third\n"]
    all_ids = tokenizer("".join(texts), add_special_tokens=False)["input_ids"]
    blocks = forgetting.token_blocks(texts, tokenizer, seq_len=8, max_samples=None)
    assert all(block[0] == tokenizer.bos_token_id for block in blocks)
    assert all(len(block) == 8 for block in blocks[:-1]) and 1 < len(blocks[-1]) <= 8
    assert [t for block in blocks for t in block[1:]] == all_ids
    limited = forgetting.token_blocks(texts, tokenizer, seq_len=8, max_samples=2)
    assert limited == blocks[:2]
    with pytest.raises(ValueError):
        forgetting.token_blocks(texts, tokenizer, seq_len=1, max_samples=1)


def test_token_blocks_stop_reading_once_enough_tokens():
    consumed = []

    def texts():
        for i in range(1000):
            consumed.append(i)
            yield "0123456789"

    forgetting.token_blocks(texts(), tiny_tokenizer(), seq_len=11, max_samples=3)
    assert len(consumed) == 3


def test_iter_texts_reads_local_files(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("one\ntwo\n")
    assert list(forgetting.iter_texts(str(plain))) == ["one\n", "two\n"]
    records = tmp_path / "rows.jsonl"
    records.write_text(json.dumps({"id": 1, "text": "alpha"}) + "\n\n" + json.dumps({"id": 2, "text": "beta"}) + "\n")
    assert list(forgetting.iter_texts(str(records))) == ["alpha", "beta"]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"body": "x"}, {"body": "y"}]))
    assert list(forgetting.iter_texts(str(array))) == ["x", "y"]
    with pytest.raises(FileNotFoundError):
        list(forgetting.iter_texts(str(tmp_path / "missing.txt")))



def test_iter_texts_loads_a_dataset_folder_like_a_hub_dataset(tmp_path):
    """A local folder goes through `datasets.load_dataset` (streamed), as a hub id does; split `test` by default."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": f"test row {i}"}) + "\n" for i in range(3)))
    (folder / "train.jsonl").write_text(json.dumps({"text": "train row"}) + "\n")
    assert list(forgetting.iter_texts(str(folder))) == ["test row 0", "test row 1", "test row 2"]
    assert list(forgetting.iter_texts(f"{folder}::train")) == ["train row"]


def test_iter_texts_reads_the_shared_gsm8k_file(shared_data_dir):
    """A real JSONL file without a `text` field: the first string field (`question`) is used."""
    path = shared_data_dir / "gsm8k_test.jsonl"
    if not path.is_file():
        pytest.skip("shared/data/gsm8k_test.jsonl not present")
    first = next(forgetting.iter_texts(str(path)))
    assert first == json.loads(path.open().readline())["question"]
