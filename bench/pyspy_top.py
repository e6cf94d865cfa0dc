"""Summarise a py-spy profile: the functions with the most samples, self and inclusive.

    py-spy record -p PID -d 10 -f raw -o /tmp/gw.txt     # collapsed stacks
    .venv/bin/python bench/pyspy_top.py /tmp/gw.txt 25

py-spy counts a thread as busy while it is inside a system call, even when the kernel
has preempted it (on two loaded cores a ``send`` that wakes the peer often is), so read
the shares with the CPU per chunk from ``bench/load.py`` (from /proc) beside them.
"""

from __future__ import annotations

import collections
import sys


def summarise(path: str, top: int = 25) -> str:
    """The report for the collapsed-stack file at ``path``."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    out = [f"{total} samples"]
    if total:
        out.append("--- self")
        out += [f"{n / total * 100:5.1f}% {f}" for f, n in own.most_common(top)]
        out.append("--- inclusive")
        out += [f"{n / total * 100:5.1f}% {f}" for f, n in inclusive.most_common(2 * top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
