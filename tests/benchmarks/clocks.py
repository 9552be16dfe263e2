"""A fake clock for the benchmarks' timers: every figure it times is a known number."""


class TickClock:
    """Moves `tick` seconds at every reading, so every interval timed between two consecutive readings is one
    tick, whatever the work in between took."""

    def __init__(self, tick: float):
        self.tick, self.now, self.readings = tick, 0.0, 0

    def __call__(self) -> float:
        self.readings += 1
        self.now += self.tick
        return self.now
