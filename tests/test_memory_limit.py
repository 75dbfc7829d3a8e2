"""The decode bench's memory limit: the bytes a decode step reads, the bandwidth it reads them at,
and the rows that stand against it (tiny models built in code and the tiny profile)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agent.bench.decode import decode_benchmarks
from agent.bench.memory_limit import bytes_per_token, limit_row, read_bandwidth
from agent.bench.report import table


def _model(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def test_a_step_reads_every_weight_once_and_one_row_of_an_untied_embedding():
    for tied in (True, False):
        model = _model(tied)
        # tied weights are one parameter; buffers (the rotary frequencies) are read too
        everything = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
        embedding = model.get_input_embeddings().weight.numel() * 4
        assert bytes_per_token(model) == (everything if tied else everything - embedding)
    half = _model(True).to(torch.bfloat16)
    assert bytes_per_token(half) * 2 == bytes_per_token(_model(True))


def test_the_limit_is_bandwidth_over_bytes():
    model = _model(True)
    bandwidth = read_bandwidth(megabytes=64, tries=2)
    assert bandwidth > 1e8  # any machine reads more than 100 MB a second
    row = limit_row(10.0, model, bandwidth)
    assert row["memory_limit_tokens_s"] == round(bandwidth / bytes_per_token(model), 1)
    assert row["of_memory_limit"] == round(10.0 / (bandwidth / bytes_per_token(model)), 3)


def test_the_single_stream_rows_stand_against_their_memory_limit():
    rows = decode_benchmarks("tiny", quick=True)
    single = [r for r in rows if r["benchmark"].startswith("single-stream")]
    assert [r["benchmark"] for r in single] == ["single-stream decode", "single-stream decode, loop only",
                                                "single-stream decode, bf16"]
    for row in single:
        assert 0 < row["of_memory_limit"] and row["memory_limit_tokens_s"] > 0 and row["read_bandwidth_gb_s"] > 0
    fp32, _, bf16 = single
    assert bf16["bytes_per_token_mb"] < fp32["bytes_per_token_mb"]  # half the bytes of the same weights
    assert "of its memory limit" in table(single)
