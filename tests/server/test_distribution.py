"""Base-model distribution: the transfer plan, the site's on-disk receiver, the mod and the coordinator.

The coordinator's :class:`Distributor` talks to real site mods through an in-process grid, so the
whole protocol (status, chunks, commit, resume, refusals) runs without Ray or a SuperLink; the
deployment e2e test (``test_deploy.py``) runs it over TLS.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_bert
from fedtune.client.base_model import make_base_model_mod, site_model_dir
from fedtune.common.audit import payload_bytes
from fedtune.common.base_files import FingerprintMismatchError, fingerprint, packaged_model_dir
from fedtune.common.model import checkpoint_tensors
from fedtune.common.model_store import (
    CHUNK_RECORD,
    IncomingModel,
    Outgoing,
    find_base_model,
    plan_transfer,
    sha256,
)
from fedtune.common.site_config import SiteConfig
from fedtune.server.distribution import Distributor
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

CHUNK = 300_000  # bytes: the tiny model's 1.95 MB word embedding spans 7 chunks


@pytest.fixture(scope="module")
def coordinator_model(tiny_base_model: Path) -> Path:
    return tiny_base_model


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("other") / "model", seed=2)


pytestmark = pytest.mark.usefixtures("task_identity")


# --- plan ------------------------------------------------------------------------------------------
def test_plan_cuts_the_byte_stream_into_chunks_that_cover_every_tensor_exactly_once() -> None:
    # Prepare: one tensor larger than a chunk, one smaller, one empty
    tensors = {"b": torch.zeros(1000), "a": torch.ones(10, dtype=torch.bfloat16), "c": torch.zeros(0)}

    # Execute
    plan = plan_transfer(tensors, chunk_bytes=1500)

    # Assert
    assert plan.total_bytes == 4000 + 20
    assert all(sum(s.end - s.start for s in chunk) <= 1500 for chunk in plan.chunks)
    assert len(plan.chunks) == 3
    covered = {
        name: sorted((s.start, s.end) for c in plan.chunks for s in c if s.name == name) for name in tensors
    }
    assert covered["a"] == [(0, 20)]
    assert covered["b"] == [(0, 1480), (1480, 2980), (2980, 4000)]  # "b" spans all three chunks
    assert [(e.name, e.dtype) for e in plan.table] == [("a", "bfloat16"), ("b", "float32"), ("c", "float32")]


def test_plan_refuses_a_non_positive_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        plan_transfer({"a": torch.zeros(3)}, chunk_bytes=0)


# --- the receiving site (on disk) ------------------------------------------------------------------
def _send_all(out: Outgoing, incoming: IncomingModel, skip: set[int] = frozenset()) -> None:
    for i in range(len(out.plan.chunks)):
        if i not in skip:
            incoming.write_chunk(i, len(out.plan.chunks), out.plan.chunk_bytes, out.chunk_arrays(i))


def _hashes(out: Outgoing) -> dict[str, str]:
    return {rel: sha256(data) for rel, data in out.files.items()}


def test_received_model_is_bit_identical_loadable_and_found_in_the_cache(coordinator_model, tmp_path) -> None:
    # Prepare
    out = Outgoing.read(coordinator_model, CHUNK)
    incoming = IncomingModel(tmp_path, out.fingerprint, node=5)

    # Execute
    _send_all(out, incoming)
    installed = incoming.commit(out.plan.table_json(), out.files, _hashes(out))

    # Assert
    assert installed == tmp_path / out.fingerprint and not incoming.folder.exists()
    assert fingerprint(installed) == fingerprint(coordinator_model) == out.fingerprint
    assert (installed / "1_Pooling" / "config.json").read_bytes() == out.files["1_Pooling/config.json"]
    assert find_base_model(out.fingerprint, None, tmp_path) == installed
    model = AutoModelForSequenceClassification.from_pretrained(installed)
    original = checkpoint_tensors(coordinator_model)
    assert all(torch.equal(original[k], v) for k, v in checkpoint_tensors(installed).items())
    assert model.config.hidden_size == 16


def test_an_installed_model_is_not_hashed_again_at_first_use(
    coordinator_model, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.common import model as model_module

    # Prepare: a model received and installed (its tensors hashed once, on assembly)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = Outgoing.read(coordinator_model, CHUNK)
    incoming = IncomingModel(tmp_path / "cache", out.fingerprint, node=8)
    _send_all(out, incoming)
    installed = incoming.commit(out.plan.table_json(), out.files, _hashes(out))

    def unread(folder: Path) -> dict:
        raise AssertionError(f"{folder} read again to fingerprint it")

    monkeypatch.setattr(model_module, "checkpoint_tensors", unread)

    # Execute / Assert: found and fingerprinted from what the commit recorded
    assert find_base_model(out.fingerprint, None, tmp_path / "cache") == installed
    assert fingerprint(installed) == out.fingerprint


def test_bfloat16_tensors_survive_the_transfer(tmp_path) -> None:
    # Prepare: a checkpoint with a bfloat16 tensor (numpy has no bfloat16)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.randn(300, dtype=torch.bfloat16), "b": torch.arange(7)}, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    out = Outgoing.read(src, chunk_bytes=256)
    incoming = IncomingModel(tmp_path / "cache", out.fingerprint, node=1)

    # Execute
    _send_all(out, incoming)
    installed = incoming.commit(out.plan.table_json(), out.files, _hashes(out))

    # Assert
    got = checkpoint_tensors(installed)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], checkpoint_tensors(src)["w"])


@pytest.mark.parametrize("dtype", ["Tensor", "float128", "no_such_dtype"])
def test_a_dtype_not_of_torch_is_refused_naming_the_tensor(coordinator_model, tmp_path, dtype) -> None:
    # Prepare: every chunk arrived; the table's first dtype is an attribute of torch that is no dtype
    out = Outgoing.read(coordinator_model, CHUNK)
    incoming = IncomingModel(tmp_path, out.fingerprint, node=6)
    _send_all(out, incoming)
    table = json.loads(out.plan.table_json())
    table[0][1] = dtype

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"`{table[0][0]}` has dtype '{dtype}', which is not a torch dtype"):
        incoming.commit(json.dumps(table), out.files, _hashes(out))
    assert not (tmp_path / out.fingerprint).exists()


def test_broken_off_transfer_resumes_from_the_chunks_on_disk(coordinator_model, tmp_path) -> None:
    # Prepare: chunks 0-2 arrived before the site's process died
    out = Outgoing.read(coordinator_model, CHUNK)
    n = len(out.plan.chunks)
    _send_all(out, IncomingModel(tmp_path, out.fingerprint, node=3), skip=set(range(3, n)))

    # Execute: a fresh process (new object) asks what is there
    again = IncomingModel(tmp_path, out.fingerprint, node=3)

    # Assert: resumable at the same chunk size; another size starts afresh and clears the old chunks
    assert again.received(CHUNK) == [0, 1, 2]
    assert again.received(CHUNK * 2) == []
    with pytest.raises(ValueError, match=r"incomplete: missing chunks \[3"):
        again.commit(out.plan.table_json(), out.files, _hashes(out))
    again.write_chunk(0, -(-out.plan.total_bytes // (CHUNK * 2)), CHUNK * 2, {})
    assert again.received(CHUNK) == [] and again.received(CHUNK * 2) == [0]


def test_tampered_bytes_are_refused_naming_both_fingerprints_and_discarded(
    coordinator_model, tmp_path
) -> None:
    # Prepare: one byte of one chunk flipped in transit
    out = Outgoing.read(coordinator_model, CHUNK)
    incoming = IncomingModel(tmp_path, out.fingerprint, node=2)
    _send_all(out, incoming, skip={1})
    bad = {k: v.copy() for k, v in out.chunk_arrays(1).items()}
    first = next(iter(bad))
    bad[first][0] ^= 0xFF
    incoming.write_chunk(1, len(out.plan.chunks), CHUNK, bad)

    # Execute / Assert
    with pytest.raises(FingerprintMismatchError) as err:
        incoming.commit(out.plan.table_json(), out.files, _hashes(out))
    assert out.fingerprint in str(err.value)
    received = str(err.value).split("hashes to ")[1].split(",")[0]
    assert len(received) == 64 and received != out.fingerprint
    assert not incoming.folder.exists() and not (tmp_path / out.fingerprint).exists()


@pytest.mark.parametrize(
    ("rel", "digest", "match"),
    [("config.json", "0" * 64, "SHA-256"), ("../escape.json", None, "leaves the model folder")],
)
def test_a_bad_file_is_refused(coordinator_model, tmp_path, rel, digest, match) -> None:
    # Prepare
    out = Outgoing.read(coordinator_model, CHUNK)
    incoming = IncomingModel(tmp_path / "cache", out.fingerprint, node=4)
    _send_all(out, incoming)
    files, hashes = dict(out.files), _hashes(out)
    files[rel] = b"{}"
    hashes[rel] = digest or hashes.get(rel, "")

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        incoming.commit(out.plan.table_json(), files, hashes)
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "cache" / out.fingerprint).exists()


# --- where a site looks --------------------------------------------------------------------------
def test_site_looks_in_its_own_folder_then_its_cache_then_the_packaged_model(
    coordinator_model, other_model, tmp_path
) -> None:
    packaged = fingerprint(packaged_model_dir())
    tiny = fingerprint(coordinator_model)

    assert find_base_model(tiny, str(coordinator_model), tmp_path) == coordinator_model
    assert find_base_model(packaged, None, tmp_path) == packaged_model_dir()
    assert find_base_model(tiny, None, tmp_path) is None  # lacks it: to be sent
    with pytest.raises(FingerprintMismatchError) as err:  # its own folder holds other weights
        find_base_model(tiny, str(other_model), tmp_path)
    assert tiny in str(err.value) and fingerprint(other_model) in str(err.value)


def test_site_without_the_model_says_how_it_gets_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="distribute-base-model") as err:
        site_model_dir(SiteConfig(model_cache_dir=str(tmp_path)), "a" * 64)
    assert "a" * 64 in str(err.value)


# --- coordinator <-> site mods ----------------------------------------------------------------------
class InProcessGrid:
    """Hands each message to the site mod of its node, as a SuperNode would; records what came back."""

    def __init__(self, sites: dict[int, dict]) -> None:
        self.sites = sites  # node -> node config
        self.mod = make_base_model_mod()
        self.silent: set[int] = set()  # nodes that stop replying (process killed)
        self.corrupt: set[int] = set()  # nodes whose chunks get a flipped byte in transit
        self.replies: list[Message] = []
        self.sent: dict[int, int] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def replies_by_node(self, messages: list[Message], *, timeout: float | None = None) -> dict[int, Message]:
        out = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent[node] = self.sent.get(node, 0) + payload_bytes(msg)
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if node in self.silent:
                continue
            if node in self.corrupt and CHUNK_RECORD in msg.content.array_records:
                msg = self._flip_first_byte(msg)
            ctxt = Context(
                run_id=1, node_id=node, node_config=self.sites[node], state=RecordDict(), run_config={}
            )
            try:
                reply = self.mod(msg, ctxt, lambda m, c: pytest.fail("base-model message passed on"))
            except Exception as err:  # noqa: BLE001 - Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self.replies.append(reply)
            out[node] = reply
        return out

    @staticmethod
    def _flip_first_byte(msg: Message) -> Message:
        record = msg.content.array_records[CHUNK_RECORD]
        arrays = {k: a.numpy().copy() for k, a in record.items()}
        first = next(iter(arrays))
        arrays[first][0] ^= 0xFF
        content = RecordDict(
            {
                **{k: ConfigRecord(dict(v)) for k, v in msg.content.config_records.items()},
                CHUNK_RECORD: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            }
        )
        copy = Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)
        copy.metadata.__dict__["_message_id"] = msg.metadata.message_id
        return copy


def _sites(tmp_path: Path, **explicit: Path) -> dict[int, dict]:
    nodes = {}
    for i, name in enumerate(("has", "lacks", "foreign", "flaky")):
        config = {"model-cache-dir": str(tmp_path / name), "data-path": f"/secret/{name}.csv"}
        if name in explicit:
            config["base-model"] = str(explicit[name])
        nodes[10 + i] = config
    return nodes


def test_coordinator_sends_the_model_only_to_sites_that_lack_it(
    coordinator_model, other_model, tmp_path
) -> None:
    # Prepare: node 10 has it, 11 lacks it, 12 has other weights, 13 gets a corrupted chunk
    grid = InProcessGrid(_sites(tmp_path, has=coordinator_model, foreign=other_model))
    grid.corrupt.add(13)
    expected = fingerprint(coordinator_model)
    dist = Distributor(grid, coordinator_model, expected, chunk_bytes=CHUNK, timeout=5)
    chunks = len(Outgoing.read(coordinator_model, CHUNK).plan.chunks)

    # Execute
    result = {t.node: t for t in dist.run([10, 11, 12, 13])}

    # Assert
    assert [result[n].status for n in (10, 11, 12, 13)] == ["had", "received", "failed", "failed"]
    assert result[10].bytes_down < 1000 and result[10].chunks_sent == 0
    assert result[11].chunks_sent == chunks and result[11].bytes_down >= sum(
        t.numel() * t.element_size() for t in checkpoint_tensors(coordinator_model).values()
    )
    assert fingerprint(tmp_path / "lacks" / expected) == expected
    assert expected in result[12].error and fingerprint(other_model) in result[12].error
    assert "FingerprintMismatchError" in result[13].error and not (tmp_path / "flaky" / expected).exists()
    assert site_model_dir(SiteConfig.parse(grid.sites[11]), expected) == tmp_path / "lacks" / expected


def test_no_site_path_or_data_goes_back_to_the_coordinator(coordinator_model, tmp_path) -> None:
    # Prepare
    grid = InProcessGrid(_sites(tmp_path, has=coordinator_model))
    dist = Distributor(grid, coordinator_model, fingerprint(coordinator_model), chunk_bytes=CHUNK, timeout=5)

    # Execute
    dist.run([10, 11])

    # Assert: replies hold only `have` and `received`; no path of the site's anywhere in them
    assert grid.replies
    for reply in grid.replies:
        record = dict(reply.content.config_records["fedtune.base-model"])
        assert set(record) == {"have", "received"} and not reply.content.array_records
        text = json.dumps(record)
        assert "secret" not in text and str(tmp_path) not in text


def test_a_site_that_died_mid_transfer_gets_only_the_missing_chunks_next_time(
    coordinator_model, tmp_path
) -> None:
    # Prepare: node 11 stops replying after 3 chunks
    grid = InProcessGrid(_sites(tmp_path))
    expected = fingerprint(coordinator_model)
    dist = Distributor(grid, coordinator_model, expected, chunk_bytes=CHUNK, timeout=5)
    out = Outgoing.read(coordinator_model, CHUNK)
    incoming = IncomingModel(tmp_path / "lacks", expected, node=11)
    _send_all(out, incoming, skip=set(range(3, len(out.plan.chunks))))
    grid.silent.add(13)

    # Execute
    result = {t.node: t for t in dist.run([11, 13])}

    # Assert: 11 resumed (the rest only); 13 never answered and is named
    assert result[11].status == "received" and result[11].chunks_sent == len(out.plan.chunks) - 3
    assert result[13].status == "failed" and "no reply within `base-model-timeout`" in result[13].error
    assert fingerprint(tmp_path / "lacks" / expected) == expected


def test_messages_stay_within_the_chunk_size(coordinator_model, tmp_path) -> None:
    grid = InProcessGrid(_sites(tmp_path))
    Distributor(grid, coordinator_model, fingerprint(coordinator_model), chunk_bytes=CHUNK, timeout=5).run(
        [11]
    )
    sizes = [payload_bytes(m) for m in grid.replies]
    assert max(sizes) < 1000  # replies are tiny
    out = Outgoing.read(coordinator_model, CHUNK)
    assert (
        max(sum(a.nbytes for a in out.chunk_arrays(i).values()) for i in range(len(out.plan.chunks))) <= CHUNK
    )
    assert np.isclose(grid.sent[11], out.plan.total_bytes + sum(map(len, out.files.values())), rtol=0.05)


def test_a_tampered_copy_in_the_model_cache_is_refused(coordinator_model, other_model, tmp_path) -> None:
    import shutil

    # Prepare: the cache holds a folder under the pinned fingerprint whose weights were then replaced
    expected = fingerprint(coordinator_model)
    cached = tmp_path / "cache" / expected
    shutil.copytree(other_model, cached)

    # Execute / Assert
    with pytest.raises(FingerprintMismatchError, match=expected):
        find_base_model(expected, None, tmp_path / "cache")
