"""kubealign.workqueue: each run queued once, worked on by one worker at a time, urgent lane first."""

from __future__ import annotations

import threading

from kubealign.workqueue import WorkQueue


def drain(queue: WorkQueue[str]) -> list[str]:
    taken = []
    while (key := queue.get(timeout=0)) is not None:
        taken.append(key)
        queue.done(key)
    return taken


def test_a_key_added_many_times_is_handed_out_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "a", "c", "b"):
        queue.add(key)
    assert queue.depth() == 3
    assert drain(queue) == ["a", "b", "c"]
    assert queue.depth() == 0


def test_urgent_keys_go_first_and_a_promoted_key_is_handed_out_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("new-1", "new-2", "going"):
        queue.add(key)
    queue.add("moved", urgent=True)
    queue.add("new-2", urgent=True)  # already queued normally: promoted, not duplicated
    assert drain(queue) == ["moved", "new-2", "new-1", "going"]


def test_a_key_added_while_in_progress_comes_back_after_done_and_not_before() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("run")
    assert queue.get(timeout=0) == "run"
    queue.add("run")
    queue.add("run", urgent=True)
    # While "run" is in progress nobody else gets it.
    assert queue.get(timeout=0) is None
    queue.done("run")
    assert queue.get(timeout=0) == "run"
    queue.done("run")
    assert queue.get(timeout=0) is None


def test_workers_never_hold_the_same_key_at_once() -> None:
    queue: WorkQueue[int] = WorkQueue()
    holding: set[int] = set()
    lock = threading.Lock()
    clashes: list[int] = []
    passes = [0] * 5

    def work() -> None:
        while (key := queue.get(timeout=0.5)) is not None:
            with lock:
                if key in holding:
                    clashes.append(key)
                holding.add(key)
                passes[key] += 1
            with lock:
                holding.discard(key)
            queue.done(key)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for round_ in range(2000):
        queue.add(round_ % 5, urgent=round_ % 3 == 0)
    for worker in workers:
        worker.join(10)
    assert clashes == []
    assert all(count >= 1 for count in passes)
    assert queue.depth() == 0


def test_shutdown_wakes_waiting_workers_and_drops_later_adds() -> None:
    queue: WorkQueue[str] = WorkQueue()
    results: list[str | None] = []
    waiter = threading.Thread(target=lambda: results.append(queue.get()))
    waiter.start()
    queue.shutdown()
    waiter.join(5)
    assert results == [None]
    queue.add("late")
    assert queue.get(timeout=0) is None
