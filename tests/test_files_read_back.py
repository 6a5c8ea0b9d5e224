"""Every file polyfast reads back decodes as data: a pickle planted in its place (which Python's
unpickler would run) is a clear error naming the file, and runs nothing. Checkpoints:
test_dcp_metadata.py and test_reliability.py; the reference log-prob cache: test_hdpo.py."""

import json
import os
import pickle

import pytest

from polyfast.cli import main
from polyfast.config import SFTConfig, load_config
from polyfast.critic import MLPCritic, References
from polyfast.data import load_pairs, load_records
from polyfast.errors import ConfigError, DataError
from polyfast.eval.evaluate import compare
from polyfast.eval.generate import load_predictions


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def planted(tmp_path):
    """plant(name) writes a live pickle payload to tmp_path/name and returns its path."""
    marker = tmp_path / "payload_ran"
    pickle.loads(pickle.dumps(_Payload(tmp_path / "live")))  # the payload is live
    assert (tmp_path / "live").exists()

    def plant(name):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(_Payload(marker)))
        return str(path)
    yield plant
    assert not marker.exists(), "a payload ran"


@pytest.mark.parametrize("name,read", [
    ("refs.json", References.load),
    ("records.jsonl", load_records),
    ("records.json", load_records),
    ("pairs.jsonl", load_pairs),
    ("predictions.jsonl", load_predictions),
])
def test_json_files_refuse_a_pickle(planted, name, read):
    path = planted(name)
    with pytest.raises(DataError) as e:
        read(path)
    assert path in str(e.value)


def test_a_critic_directory_refuses_a_pickle_in_either_file(planted, tmp_path):
    critic = MLPCritic(34, ["en|single|qa|short"], hidden=8, bucket_dim=4)
    critic.save(str(tmp_path / "critic"))
    MLPCritic.load(str(tmp_path / "critic"))  # what it saved loads
    for name in ("critic.safetensors", "critic.json"):
        path = planted(f"critic/{name}")
        with pytest.raises(DataError) as e:
            MLPCritic.load(str(tmp_path / "critic"))
        assert path in str(e.value)
        critic.save(str(tmp_path / "critic"))


def test_a_critic_json_that_does_not_match_its_tensors_is_named(tmp_path):
    MLPCritic(34, ["a", "b"], hidden=8, bucket_dim=4).save(str(tmp_path / "c"))
    meta = json.loads((tmp_path / "c" / "critic.json").read_text())
    (tmp_path / "c" / "critic.json").write_text(json.dumps({**meta, "hidden": 16}))
    with pytest.raises(DataError) as e:
        MLPCritic.load(str(tmp_path / "c"))
    assert "critic.safetensors" in str(e.value) and "does not match critic.json" in str(e.value)


def test_references_with_the_wrong_layout_are_named(tmp_path):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"features": ["a"], "stats": [], "min_bucket_size": 2}))
    with pytest.raises(DataError) as e:
        References.load(str(path))
    assert str(path) in str(e.value) and "references" in str(e.value)


def test_eval_compare_refuses_a_pickled_metrics_file(planted, tmp_path):
    path = planted("run/metrics.json")
    with pytest.raises(DataError) as e:
        compare([str(tmp_path / "run")], str(tmp_path / "out"))
    assert path in str(e.value)
    assert main(["eval", "--compare", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2


def test_a_config_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "cfg.yaml"
    path.write_text(f"run_dir: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, str(path), [])
    assert not marker.exists(), "a payload ran"
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError):
        load_config(SFTConfig, None, [f"run_dir=!!python/object/apply:os.mkdir [{str(marker)!r}]"])
    assert not marker.exists(), "a payload ran"
