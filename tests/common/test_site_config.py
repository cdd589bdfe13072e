"""A site's node config is typed once; a key no site knows is refused naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedtune.client.app import make_client_app
from fedtune.common.config import ConfigError
from fedtune.common.site_config import KEYS, SiteConfig
from fedtune.common.site_errors import SiteError
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType


def test_simulation_and_deployment_node_configs_are_typed() -> None:
    # Execute
    simulated = SiteConfig.parse({"partition-id": "2", "num-partitions": 5})
    deployed = SiteConfig.parse(
        {"data-path": "/d/a.csv", "model-cache-dir": "~/cache", "require-secure-aggregation": "True"}
    )

    # Assert
    assert (simulated.partition_id, simulated.num_partitions, simulated.data_path) == (2, 5, "")
    assert simulated.label(node_id=99) == "2" and deployed.label(node_id=99) == "99"
    assert deployed.require_secure_aggregation is True and simulated.require_secure_aggregation is False
    assert SiteConfig.parse({"require-secure-aggregation": " false "}).require_secure_aggregation is False
    assert str(deployed.cache_dir).endswith("/cache") and "~" not in str(deployed.cache_dir)
    assert simulated.cache_dir is None


def test_node_config_round_trips_through_its_items() -> None:
    site = SiteConfig(data_path="/d/a.csv", audit_dir="/out/audit", require_secure_aggregation=True)

    assert site.node_config() == {
        "data-path": "/d/a.csv",
        "audit-dir": "/out/audit",
        "require-secure-aggregation": "true",
    }
    assert SiteConfig.parse(site.node_config()) == site
    first = SiteConfig(partition_id=0, num_partitions=3, worker_socket="/run/w.sock")  # partition 0 is set
    assert SiteConfig.parse(first.node_config()) == first
    assert set(KEYS) == {"partition-id", "num-partitions", "data-path", "audit-dir", "model-cache-dir"} | {
        "base-model",
        "require-secure-aggregation",
        "worker-socket",
    }


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"data_path": "/d/a.csv"}, "`data_path` unknown to a fedtune site; valid: `partition-id`"),
        ({"partition-id": "two"}, "`partition-id` must be a whole number, got 'two'"),
        ({"require-secure-aggregation": "yes"}, "`require-secure-aggregation` must be true or false"),
    ],
)
def test_a_bad_node_config_is_refused_naming_the_key(node_config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SiteConfig.parse(node_config)


@pytest.mark.usefixtures("task_identity")
def test_the_client_app_refuses_a_misspelt_node_config_key(tmp_path: Path) -> None:
    # Prepare: a deployed site's operator wrote data_path for data-path
    app = make_client_app(site_log_dir=str(tmp_path))
    msg = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN, group_id="1")
    ctxt = Context(
        run_id=1, node_id=7, node_config={"data_path": "/d/a.csv"}, state=RecordDict(), run_config={}
    )

    # Execute / Assert: no training on a silently ignored key; the coordinator learns only the category
    with pytest.raises(SiteError, match=r"site error \[config\]"):
        app(msg, ctxt)
    assert "`data_path` unknown to a fedtune site" in (tmp_path / "site-7.log").read_text()


def test_a_site_reads_its_own_file_even_when_simulated(tmp_path: Path) -> None:
    from fedtune.common.config import parse_run_config
    from fedtune.common.sites import site_data

    # Prepare: a simulated site given a file of its own (as `bench diabetes` gives each site one)
    path = tmp_path / "site.csv"
    path.write_text("text,label\n" + "".join(f"note {i},{'ab'[i % 2]}\n" for i in range(40)))
    cfg = parse_run_config(
        {"task": "csv", "data-path": str(tmp_path / "pool.csv"), "text-column": "text", "labels": "a,b"}
    )
    site = SiteConfig(partition_id=0, num_partitions=3, data_path=str(path))

    # Execute
    data = site_data(cfg, site)

    # Assert: its rows are those of its own file, split into train and its local test split
    assert len(data.train) + len(data.test) == 40
    assert set(data.train.texts) | set(data.test.texts) == {f"note {i}" for i in range(40)}


def test_a_node_config_naming_no_data_is_refused() -> None:
    from fedtune.common.config import parse_run_config
    from fedtune.common.sites import site_data

    with pytest.raises(ValueError, match="names no data"):
        site_data(parse_run_config({}), SiteConfig(model_cache_dir="/c"))


def test_site_config_parses_each_distinct_node_config_once_and_refuses_a_bad_one_every_time() -> None:
    from fedtune.common.site_config import site_config

    # Execute
    first = site_config({"partition-id": 1, "num-partitions": 3})
    again = site_config({"num-partitions": 3, "partition-id": 1})  # same items, other order
    other = site_config({"partition-id": 2, "num-partitions": 3})

    # Assert
    assert first is again and first == SiteConfig(partition_id=1, num_partitions=3)
    assert other.partition_id == 2
    for _ in range(2):
        with pytest.raises(ConfigError, match="`data-pth`"):
            site_config({"data-pth": "x.csv"})
