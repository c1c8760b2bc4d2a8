"""The default actor pool fills the machine (engine.stages.actor_scoring.fit_resources): a CPU
pool the job does not size gets every node's cores as torch threads while leaving Ray CPUs to
Ray Data's read tasks; whatever the job sets wins."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import parse_job
from engine.stages.actor_scoring import (
    READ_CPUS,
    check_placement,
    default_pool,
    fit_resources,
)
from engine.stages.contract import ActorResources


def lm_resources(resources: dict) -> ActorResources:
    """stages.lm.resources as a job spec parses it (what the job set is what it set)."""
    job = parse_job({"inputs": [{"path": "a"}], "stages": {"lm": {"resources": resources}}})
    return job.stages.lm.resources


def test_two_cpu_machine_gets_one_actor_with_both_cores() -> None:
    assert default_pool([2.0]) == (1, 1.0, 2)
    fitted = fit_resources(lm_resources({"batch_size": 8}), [2.0])
    assert (fitted.concurrency, fitted.num_cpus, fitted.threads(), fitted.batch_size) == (
        1,
        1.0,
        2,
        8,
    )
    assert default_pool([16.0]) == (2, 7.5, 8)  # past 8 threads a node gets a second actor
    assert default_pool([0.0, 4.0, 4.0]) == (2, 3.0, 4)  # a CPU-less head node holds none
    assert default_pool([1.0]) is None  # no CPU left for the reads: the declared pool stays


def test_what_the_job_sets_wins() -> None:
    given_cpus = fit_resources(lm_resources({"num_cpus": 1}), [8.0])
    assert (given_cpus.concurrency, given_cpus.num_cpus, given_cpus.threads()) == (1, 1.0, 1)
    given_pool = fit_resources(lm_resources({"concurrency": 3, "num_cpus": 0.5}), [8.0])
    assert (given_pool.concurrency, given_pool.num_cpus) == (3, 0.5)
    given_threads = fit_resources(lm_resources({"num_threads": 1}), [4.0])
    assert (given_threads.concurrency, given_threads.num_cpus, given_threads.threads()) == (
        1,
        3.0,
        1,
    )
    gpu = fit_resources(lm_resources({"num_gpus": 1}), [8.0])
    assert (gpu.concurrency, gpu.num_cpus) == (1, 1.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=256), min_size=1, max_size=8))
def test_default_pool_always_leaves_room_for_reads(nodes: list[int]) -> None:
    cpus = [float(n) for n in nodes]
    sized = default_pool(cpus)
    if sized is None:
        assert all(c < 1 + READ_CPUS for c in cpus)
        return
    actors, per_actor, threads = sized
    eligible = [c for c in cpus if c >= 1 + READ_CPUS]
    per_node = actors // len(eligible)
    assert actors == per_node * len(eligible) and per_node >= 1
    assert per_node * per_actor <= min(eligible) - READ_CPUS + 1e-9  # fits every node
    assert threads >= 1 and per_node * threads <= min(eligible)  # no oversubscribed cores
    check_placement(fit_resources(ActorResources(), cpus), "lm", sum(cpus))  # never refused
