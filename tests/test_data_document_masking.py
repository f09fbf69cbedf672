"""Packed rows from the data pipeline keep documents apart in the model, for attention and for GLA."""

from dataclasses import replace

import pytest
import torch
from torchdata.nodes import IterableWrapper

from data_pipelines.packing import Packer
from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors

SEQ_LEN, EOS, VOCAB = 48, 0, 512


def packed_row(docs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first packed row (``input``, ``positions``) of ``docs``, through the pipeline's packer."""
    packer = Packer(IterableWrapper([(ids, 0, "web") for ids in docs]), SEQ_LEN, EOS)
    packer.reset()
    tokens, _, positions = next(packer)
    return tokens[None], positions[None]


def model(pattern: str, document_masking: bool) -> HybridLM:
    args = replace(
        hybrid_flavors["debug"],
        pattern=pattern,
        n_layers=len(pattern),
        dim=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        vocab_size=VOCAB,
        max_seq_len=SEQ_LEN,
        document_masking=document_masking,
    )
    torch.manual_seed(0)
    m = HybridLM(args)
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("pattern", ["AA", "gg"])
def test_changing_one_document_leaves_the_others_unchanged(pattern):
    g = torch.Generator().manual_seed(0)
    doc = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    first, middle, last = doc(12), doc(15), doc(30)  # the last one runs past the row
    other_middle = doc(15)
    tokens_a, positions = packed_row([first, middle, last])
    tokens_b, positions_b = packed_row([first, other_middle, last])
    assert torch.equal(positions, positions_b)
    middle_span = slice(len(first) + 1, len(first) + 1 + len(middle) + 1)  # with its EOS
    last_span = slice(middle_span.stop, SEQ_LEN)
    assert positions[0, middle_span.start] == 0 and positions[0, last_span.start] == 0

    with torch.no_grad():
        masked = model(pattern, document_masking=True)
        out_a, out_b = masked(tokens_a, positions), masked(tokens_b, positions)
        assert not torch.allclose(out_a[:, middle_span], out_b[:, middle_span])
        torch.testing.assert_close(out_a[:, : middle_span.start], out_b[:, : middle_span.start], rtol=0, atol=1e-5)
        torch.testing.assert_close(out_a[:, last_span], out_b[:, last_span], rtol=0, atol=1e-5)

        unmasked = model(pattern, document_masking=False)
        out_a, out_b = unmasked(tokens_a, positions), unmasked(tokens_b, positions)
        torch.testing.assert_close(out_a[:, : middle_span.start], out_b[:, : middle_span.start], rtol=0, atol=1e-5)
        assert (out_a[:, last_span] - out_b[:, last_span]).abs().max() > 1e-3


def test_the_trainer_hands_the_model_the_documents_of_each_batch():
    """On CUDA with document masking, each batch carries its documents found on the host
    (``HostDocuments``, which TorchTitan passes to the forward untouched); the forward binds them and
    gives the same output as finding them itself."""
    import itertools
    from types import SimpleNamespace

    from titan_hybrid.ops.common import HostDocuments, resets_to_cu_seqlens
    from titan_hybrid.trainer import HybridTrainer

    g = torch.Generator().manual_seed(1)
    tokens, positions = packed_row([torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (12, 15, 30)])

    def first_batch(device: str, document_masking: bool) -> dict:
        trainer = HybridTrainer.__new__(HybridTrainer)  # only what batch_generator reads
        trainer.device, trainer._step_batches, trainer.ntokens_seen = torch.device(device), [], 0
        trainer.model_args = SimpleNamespace(document_masking=document_masking)
        trainer.metrics_processor = SimpleNamespace(ntokens_since_last_log=0, data_loading_times=[])
        batches = trainer.batch_generator([({"input": tokens, "positions": positions}, tokens)])
        (input_dict, _), = itertools.islice(batches, 1)
        (kept, _), = trainer._step_batches
        assert kept.keys() == {"input", "positions"} and kept["input"] is tokens, "kept as the loader gave it"
        return input_dict

    input_dict = first_batch("cuda", document_masking=True)
    documents = input_dict["documents"]
    assert isinstance(documents, HostDocuments)
    assert documents.cu_seqlens.tolist() == resets_to_cu_seqlens(positions == 0).tolist() == [0, 13, 29, 48]
    assert "documents" not in first_batch("cpu", document_masking=True)
    assert "documents" not in first_batch("cuda", document_masking=False)
    with torch.no_grad():
        masked = model("gA", document_masking=True)
        torch.testing.assert_close(masked(tokens, positions, documents=documents), masked(tokens, positions),
                                   rtol=0, atol=0)  # fmt: skip
