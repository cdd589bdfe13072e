"""The ClientApp answers messages that need no model without importing torch (``client/app.py``).

In deployment every message runs in a fresh ``flwr-clientapp`` process, so these run in one too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedtune.common.base_files import fingerprint, packaged_model_dir

# One fresh process: a SecAgg+ setup message and a base-model status query through the real ClientApp.
SCRIPT = r"""
import json, sys
from flwr.supercore.task_identity import TaskIdentity
for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
    setattr(TaskIdentity, name, value)
from fedtune.client.app import app
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

def ask(record, content, kind):
    msg = Message(RecordDict({record: ConfigRecord(content)}), dst_node_id=7, message_type=kind, group_id="1")
    return app(msg, Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}))

setup = {"stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0,
         "target_range": 2**22, "mod_range": 2**32, "max_weight": 1000.0}
keys = ask("secaggplus_configs", setup, MessageType.TRAIN).content.config_records["secaggplus_configs"]
status = {"op": "status", "fingerprint": sys.argv[1], "chunk-bytes": 1024}
have = ask("fedtune.base-model", status, MessageType.QUERY).content.config_records["fedtune.base-model"]
heavy = [m for m in ("torch", "transformers", "peft", "opacus", "dp_accounting") if m in sys.modules]
print(json.dumps({"keys": sorted(keys), "have": have["have"], "heavy": heavy}))
"""


def _answer(expected: str, cache: Path) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, expected], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_key_exchange_and_a_known_base_model_need_no_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the packaged model's fingerprint kept in this cache (as after its first use)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = fingerprint(packaged_model_dir())

    # Execute
    answer = _answer(expected, tmp_path / "cache")

    # Assert: SecAgg+ public keys and "have", and no heavy library imported
    assert answer == {"keys": ["pk1", "pk2"], "have": True, "heavy": []}


def test_a_base_model_not_yet_fingerprinted_is_hashed_with_torch(tmp_path: Path) -> None:
    # Prepare: an empty model cache: the site must hash the packaged model's weights once
    expected = fingerprint(packaged_model_dir())

    # Execute
    answer = _answer(expected, tmp_path / "empty")

    # Assert: the same answer, at the price of torch (the sidecar is what spares it above)
    assert answer["have"] is True and "torch" in answer["heavy"]
    assert len(list((tmp_path / "empty" / "fedtune" / "models" / "fingerprints").glob("*.json"))) == 1
