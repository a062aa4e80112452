"""Issue 20.1, as a dishonest server would try it: a secure-aggregation graph too sparse for the cohort.

Before (cb416a4): ``secagg.degree = 4`` passed every device's policy whatever the cohort size (the
split-view attack used it with 9 devices), and a device that counts on colluders had no way to ask
for a threshold that covers them. Now each device checks the graph of the largest cohort the run
allows (and of each request's own cohort) against SecAgg+'s analysis: degree at least
2 ceil(1.5 log2 n) (at most n - 1), threshold a strict majority of the k + 1 share holders and, with
``policy.max-colluders = c``, at least ``policy.min-contributors + c``; it refuses naming the setting
and saying why, before it trains.

The real ServerApp loop and ClientApp, tiny model, each device's own data and state folders.
"""

import pytest

from fedpersona.privacy.secagg.graph import default_threshold
from tests.adversarial.helpers import flat_config, replies, run, user_folders


@pytest.mark.parametrize("over, node_policy, setting, why", [
    ({"secagg.degree": 4, "server.clients-per-round": 12}, {}, "secagg.degree = 4",
     "a cohort of 12 needs a graph degree of at least 11"),
    ({"secagg.degree": 8, "server.clients-per-round": 40}, {}, "secagg.degree = 8",
     "a cohort of 40 needs a graph degree of at least 16"),
    ({}, {"policy.max-colluders": 1}, "secagg.threshold = '0 (t = 2)'",
     "with policy.max-colluders = 1 the threshold must be at least policy.min-contributors + 1 = 4"),
], ids=["degree-4-of-12", "degree-8-of-40", "threshold-with-a-colluder"])
def test_a_graph_too_weak_for_the_cohort_is_refused_by_name(tiny_config, tmp_path, over, node_policy, setting, why):
    nodes = user_folders(tmp_path)
    for nc in nodes.values():
        nc.update(node_policy)
    metrics = run(flat_config(tiny_config, **over), nodes)
    (row,) = metrics["rounds"]
    assert row["contributors"] == 0 and not row["applied"], row
    for nid, lines in replies(nodes).items():
        (reply,) = lines
        assert reply["reply"] == "error" and not reply["rows"]
        reason = reply["error"]["reason"]
        assert reason.startswith(f"PolicyViolation: the device's privacy policy refuses {setting}: {why}"), reason


def test_required_degree_follows_the_analysis():
    """2 ceil(1.5 log2 n), the complete graph below it; a weaker graph is refused for each cohort size, not the default."""
    from fedpersona.client.policy import DevicePolicy, PolicyViolation, required_degree

    assert [required_degree(n) for n in (3, 9, 12, 33, 40, 64, 100, 1000)] == [2, 8, 11, 16, 16, 18, 20, 30]
    policy = DevicePolicy()
    for n in (3, 9, 12, 33, 64, 200):
        k = required_degree(n)
        policy.check_graph(n, k, default_threshold(k))  # the default graph of that size passes
        with pytest.raises(PolicyViolation, match=r"secagg.degree .*SecAgg\+ \(Bell et al. 2020\)"):
            policy.check_graph(n, k - 1, default_threshold(k - 1))
    with pytest.raises(PolicyViolation, match="strict|policy.min-threshold-fraction"):
        policy.check_graph(12, 11, 6)
    with pytest.raises(PolicyViolation, match="no survivor set of a cohort of 3"):
        DevicePolicy(max_colluders=3, min_contributors=2).check_graph(3, 2, 3)
