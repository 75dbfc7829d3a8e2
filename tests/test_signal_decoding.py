import torch

from models.decoding.signal_spans import SignalSpanProcessor


def test_started_spans_are_forced_to_completion_and_inner_tokens_never_start_one():
    processor = SignalSpanProcessor({"image": [10, 11, 12], "audio": [20, 21]})
    scores = torch.zeros(3, 30)
    out = processor(torch.tensor([[1, 10], [1, 11], [1, 5]]), scores)
    assert out[0].argmax() == 11 and torch.isinf(out[0]).sum() == 29
    assert out[1].argmax() == 12
    assert torch.isinf(out[2, [11, 12, 21]]).all() and out[2, 10] == 0 and out[2, 20] == 0
