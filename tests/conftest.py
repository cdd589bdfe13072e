"""Test options: end-to-end simulations run only with ``--run-e2e`` (or ``-m e2e``)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-e2e", action="store_true", help="also run the end-to-end Flower simulations")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-e2e") or "e2e" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="end-to-end simulation: run with --run-e2e")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


def save_tiny_bert(folder: Path, seed: int) -> Path:
    """A 2-layer, 16-wide BERT with the packaged tokenizer: a stand-in for a consortium's own base model
    that no site has (the packaged MiniLM's tokenizer, other weights)."""
    import torch
    from fedtune.common.base_files import packaged_model_dir
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    shutil.copytree(packaged_model_dir() / "1_Pooling", folder / "1_Pooling")  # a file in a subfolder
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        shutil.copy(packaged_model_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model folder none of the sites has (see :func:`save_tiny_bert`)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-base") / "model", seed=1)


def save_tiny_llama(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A randomly initialised 2-layer, 32-wide Llama causal LM with a byte-level BPE tokenizer trained on
    ``texts`` (400 tokens, EOS ``<eos>``, padding ``<pad>``): the unit tests' generative base model,
    built from a config, no download."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        initializer_range=0.2,  # logits wide enough for a small adapter to move them (0.02 caps them near 0)
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM whose tokenizer knows ICD-10-CM descriptions and codes (:func:`save_tiny_llama`)."""
    from fedtune.common.data import load_task

    ds = load_task("icd10-code", max_examples=3000, seed=0)
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", [*ds.texts, *ds.targets])


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tiny CPU batches (on 2 shared cores, OpenMP spinning across
    threads makes each step far slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def base_dir() -> Path:
    """The packaged base model's folder."""
    from fedtune.common.base_files import resolve_model_dir

    return resolve_model_dir("")


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (Ray's workers, a SuperNode's ClientApps), as a crash would."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture
def kill_tree() -> Callable[[int], None]:
    """A function that SIGKILLs a process and all its descendants and waits for them."""
    return _kill_tree


@contextlib.contextmanager
def fake_task_identity() -> Iterator[None]:
    """A fake running task while the block runs: Flower 1.42 stamps every new message with the task's
    identity."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            mp.setattr(TaskIdentity, name, value)
        yield


@pytest.fixture
def task_identity() -> Iterator[None]:
    """:func:`fake_task_identity` for one test."""
    with fake_task_identity():
        yield


@pytest.fixture
def round_records() -> list:
    """Two round records as the coordinator writes them: round 0 (scores only) and a trained round."""
    from fedtune.common.records import RoundRecord

    return [
        RoundRecord(round=0, accuracy=0.1, macro_f1=0.05, loss=3.0),
        RoundRecord(
            round=1,
            accuracy=0.6,
            macro_f1=0.3,
            loss=1.2,
            train_loss=1.5,
            sites_accuracy=0.55,
            bytes_up=2_500_000,
            bytes_down=3_000_000,
            seconds=12.34,
        ),
    ]
