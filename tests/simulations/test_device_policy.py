"""The runner gives simulated devices a policy only when asked (--device-policy), and takes it back."""

import pytest

from fedpersona.simulations.partitions import simulated_state_dir
from fedpersona.client.policy import POLICY_FILE, DevicePolicy
from fedpersona.config import load_config
from fedpersona.simulations.runner import POLICY_HEADER, write_device_policies


def test_written_when_asked_removed_when_not_and_never_someone_elses(tiny_config):
    cfg = load_config(tiny_config, env=False)
    users = ["HAMLET (Hamlet)", "OPHELIA (Hamlet)"]
    write_device_policies(cfg, users, {"allow-no-dp": True, "policy.max-epsilon": 4.0})
    for u in users:
        folder = simulated_state_dir(cfg, u)
        assert (folder / POLICY_FILE).read_text().startswith(POLICY_HEADER)
        p = DevicePolicy.load({}, state_dir=folder)
        assert p.allow_no_dp is True and p.max_epsilon == 4.0
    write_device_policies(cfg, users, None)
    assert not any((simulated_state_dir(cfg, u) / POLICY_FILE).exists() for u in users)
    mine = simulated_state_dir(cfg, users[0]) / POLICY_FILE
    mine.write_text("max-epsilon = 1.0\n")
    write_device_policies(cfg, users, None)
    assert mine.read_text() == "max-epsilon = 1.0\n", "a policy the runner did not write is never touched"
    with pytest.raises(ValueError, match="was not written by the runner"):
        write_device_policies(cfg, users, {"allow-no-dp": True})
    with pytest.raises(ValueError, match="Unknown device policy key 'policy.allow-no-pd'"):
        write_device_policies(cfg, users, {"allow-no-pd": True})
