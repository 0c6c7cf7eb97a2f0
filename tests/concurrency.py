"""Run one reduced model from several threads at once and compare with single-thread results."""
import threading


def failures_in_threads(call, inputs, want, same, reps: int = 10) -> list:
    """Thread i runs call(inputs[i]) `reps` times while the others run theirs; returns
    (thread, what went wrong) for every call whose result is not `same` as want[i] or raised."""
    bad = []
    start = threading.Barrier(len(inputs))

    def work(i):
        start.wait()  # all threads begin together, so their forwards interleave
        for _ in range(reps):
            try:
                if not same(call(inputs[i]), want[i]):
                    bad.append((i, "different output"))
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                bad.append((i, repr(exc)))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return bad
