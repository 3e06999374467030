"""CPU time of every process on this machine while a block runs, by kind of process.

    with ProcessCpu() as cpu:
        ...                      # e.g. a sweep
    for kind, use in cpu.by_kind().items():
        print(kind, use.processes, use.seconds)

A Ray actor is known by its process title (``ray::TrainController``, a method's name left
out), Ray's own daemons by their program (``gcs_server``, ``raylet``) or module, any other
Python process by what it runs (``-m autoassign.train``). Every process's user + system CPU
time is read from ``/proc`` every ``interval`` seconds (Linux only), so a process that starts
and ends between two reads is missed, and one that lives on after the block counts up to
the block's end only. Processes that ran before the block count from its start.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

IDLE_TITLES = ("ray::IDLE", "ray::IDLE_SPILL_WORKER", "ray::IDLE_RESTORE_WORKER")


@dataclass
class CpuUse:
    """CPU seconds (user + system) taken by the processes of one kind."""

    processes: int = 0
    seconds: float = 0.0


@dataclass
class _Seen:
    kind: str
    cpu: float  # seconds, the last read
    baseline: float  # seconds at the block's start (0 for a process started within it)


def kind_of(command: list[str]) -> str:
    """What a process is, from its command line (``/proc/<pid>/cmdline`` split at NULs)."""
    if not command:
        return ""
    if command[0].startswith("ray::"):
        return command[0].split(" ")[0].split(".")[0]  # ray::Actor.method -> ray::Actor
    program = Path(command[0]).name
    if not program.startswith("python"):
        return program
    arguments = [a for a in command[1:] if a not in ("-u", "-B", "-O")]
    if len(arguments) >= 2 and arguments[0] == "-m":
        return f"-m {arguments[1]}"
    return Path(arguments[0]).name if arguments else program


def telling(kind: str) -> int:
    """How much a kind says: an actor's title, over a program's name, over nothing."""
    if kind.startswith("ray::") and kind not in IDLE_TITLES:
        return 2
    return 1 if kind else 0


def read_processes() -> dict[tuple[int, int], tuple[str, float]]:
    """Every process's kind and CPU seconds, by (pid, start time in clock ticks)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        started = int(fields[19])
        found[(int(entry), started)] = (kind_of([p for p in command.split("\0") if p]), cpu)
    return found


class ProcessCpu:
    """Samples :func:`read_processes` in a thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._seen: dict[tuple[int, int], _Seen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-cpu", daemon=True)

    def __enter__(self) -> ProcessCpu:
        for key, (kind, cpu) in read_processes().items():
            self._seen[key] = _Seen(kind, cpu, baseline=cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def _read(self) -> None:
        for key, (kind, cpu) in read_processes().items():
            seen = self._seen.get(key)
            if seen is None:
                self._seen[key] = _Seen(kind, cpu, baseline=0.0)
                continue
            seen.cpu = cpu
            # A Ray worker starts as a Python script, is titled ray::IDLE, and takes its
            # actor's title once it has one; an ended process (a zombie) has no command line
            # left. Keep the most telling name.
            if telling(kind) > telling(seen.kind):
                seen.kind = kind

    def by_kind(self) -> dict[str, CpuUse]:
        """CPU use within the block by kind of process, the largest first; kinds that took
        no CPU are left out."""
        uses: dict[str, CpuUse] = {}
        for seen in self._seen.values():
            seconds = seen.cpu - seen.baseline
            if seconds <= 0:
                continue
            use = uses.setdefault(seen.kind or "(ended before it was named)", CpuUse())
            use.processes += 1
            use.seconds += seconds
        return dict(sorted(uses.items(), key=lambda item: -item[1].seconds))


def print_cpu(label: str, cpu: ProcessCpu | None, trials: int, *, least: float = 0.5) -> None:
    """The CPU each kind of process took, in all and per trial (kinds under ``least``
    seconds in all are summed in one line)."""
    if cpu is None:
        return
    uses = cpu.by_kind()
    print(f"{label} CPU by process ({sum(u.seconds for u in uses.values()):.1f} s in all):")
    rest = CpuUse()
    for kind, use in uses.items():
        if use.seconds < least:
            rest.processes += use.processes
            rest.seconds += use.seconds
            continue
        print(
            f"  {kind[:48]:48s} x{use.processes:<3d} {use.seconds:7.1f} s"
            f"  {use.seconds / trials:6.2f} s per trial"
        )
    if rest.processes:
        print(f"  {'(others)':48s} x{rest.processes:<3d} {rest.seconds:7.1f} s")


def cpu_sampler() -> ProcessCpu | contextlib.nullcontext:
    """A :class:`ProcessCpu` where ``/proc`` can be read, else nothing."""
    return ProcessCpu() if Path("/proc/self/stat").exists() else contextlib.nullcontext()
