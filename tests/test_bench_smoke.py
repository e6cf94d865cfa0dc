"""The benchmark modes import, and their pure helpers work on synthetic data (no Podman).

bench/ is a directory of scripts, not a package: its modules import ``_common`` by plain
name, as they do when run as ``python bench/scale.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _common  # noqa: E402


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"c2l_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scale = _load("scale")
load = _load("load")


def test_percentiles_by_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # unordered on purpose
    assert _common.pct(values, 50) == 50
    assert _common.pct(values, 99) == 99
    assert _common.pct(values, 100) == 100
    assert _common.pct([7.0], 99) == 7
    with pytest.raises(ValueError, match="no values"):
        _common.pct([], 50)
    assert _common.summary([]) == {"n": 0, "p50": None, "p99": None, "max": None}
    assert _common.summary([3.0, 1.0, 2.0]) == {"n": 3, "p50": 2.0, "p99": 3.0, "max": 3.0}


def test_proc_stat_with_a_name_holding_spaces_and_parentheses() -> None:
    fields = ["S", "42"] + ["0"] * 9 + ["250", "50"] + ["0"] * 30
    st = _common.parse_stat("1234 (a) (b c) " + " ".join(fields))
    assert st == _common.ProcStat("a) (b c", 42, 300)


def test_pss_meminfo_subuid_parsers() -> None:
    smaps = "55d0-7ffc ---p 00000000 00:00 0 [rollup]\nRss: 900 kB\nPss: 812 kB\nPss_Anon: 7 kB\n"
    assert _common.parse_pss_kb(smaps) == 812
    with pytest.raises(ValueError, match="no Pss"):
        _common.parse_pss_kb("Rss: 9 kB\n")
    meminfo = "MemTotal:  1000 kB\nMemFree:  100 kB\nMemAvailable:  250 kB\nHugePages_Total: 0\n"
    assert _common.parse_meminfo_used(meminfo) == 750 * 1024
    subuid = "c2lsvc:100000:65536\nc2lbench:165536:65536\n1003:300000:10\n"
    assert _common.parse_subuid(subuid, "c2lbench", 1002) == ((165536, 231072),)
    assert _common.parse_subuid(subuid, "x", 1003) == ((300000, 300010),)
    user = _common.ServiceUser("c2lbench", 1002, ((165536, 231072),))
    assert user.owns(1002) and user.owns(166537)
    assert not user.owns(100000) and not user.owns(231072)


TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A375 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 5551 1
   1: 0100007F:1F90 0100007F:A375 01 00000000:00000000 00:00000000 00000000     0        0 6662 1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7773 1
"""


def test_listening_sockets_and_fd_links() -> None:
    assert _common.parse_tcp_listeners(TCP) == {5551: 0xA375, 7773: 22}
    assert scale.socket_inode("socket:[5551]") == 5551
    assert scale.socket_inode("pipe:[5551]") is None
    assert scale.socket_inode("/dev/null") is None


def _proc(pid: int, ppid: int, comm: str, ticks: int = 0, service: bool = False) -> _common.Proc:
    return _common.Proc(pid, ppid, 1002, comm, ticks, service)


def test_a_sessions_processes_are_its_containers_conmons_and_rootlessport() -> None:
    procs = {
        p.pid: p
        for p in (
            _proc(10, 1, "podman", service=True),
            _proc(11, 10, "rootlessport"),
            _proc(12, 11, "exe"),  # rootlessport-child
            _proc(13, 10, "rootlessport"),  # another pod's
            _proc(20, 1, "conmon"),
            _proc(21, 20, "catatonit"),
            _proc(30, 1, "conmon"),
            _proc(31, 30, "python3"),
            _proc(40, 10, "slirp4netns"),  # shared, no session's
        )
    }
    containers = [
        {"PodName": "c2l-pod-a", "Pid": 21, "Ports": [{"host_port": 41845}]},
        {"PodName": "c2l-pod-a", "Pid": 31, "Ports": [{"host_port": 41845}]},
        {"PodName": "c2l-pod-b", "Pid": 99, "Ports": []},  # exited: nothing found
    ]
    got = scale.session_processes(containers, procs, {41845: 11, 40000: 13})
    assert got == {"c2l-pod-a": {11, 12, 20, 21, 30, 31}}
    assert _common.descendants(procs, [10]) == {10, 11, 12, 13, 40}
    kinds = {pid: _common.kind_of(p) for pid, p in procs.items()}
    assert kinds[10] == "podman service" and kinds[12] == "rootlessport"
    assert kinds[31] == "proxy" and kinds[21] == "infra/pause"


def test_cpu_delta_counts_new_processes_from_zero_and_groups_by_kind() -> None:
    tck = _common.CLK_TCK
    before = _common.CpuSample(0.0, {1: 100, 2: 50, 3: 10}, {1: "gateway", 2: "proxy", 3: "proxy"})
    after = _common.CpuSample(
        1.0, {1: 100 + tck, 2: 50 + tck // 2, 4: tck}, {1: "gateway", 2: "proxy", 4: "proxy"}
    )
    spent = _common.cpu_delta(before, after)
    assert spent == pytest.approx({"gateway": 1.0, "proxy": 1.5})


def test_tables() -> None:
    text = _common.table(["name", "value"], [["a", "1"], ["longer", "22"]])
    lines = text.splitlines()
    assert lines[0] == "name    value"
    assert lines[1] == "------  -----"
    assert lines[2] == "a           1"
    assert lines[3] == "longer     22"
    assert _common.key_values([["a", "x"], ["bbb", "y z"]]) == "a    x\nbbb  y z"
    assert _common.fmt(None) == "-"
    assert _common.fmt(0.0123, 1000, " ms") == "12.30 ms"


def test_phase_times_stamped_lines_and_counts_the_others() -> None:
    phase = load.Phase("path")
    line = '{"created_at": "2026-12-01T15:00:00.000000Z", "done": false}'
    at = _common.produced_at(line)
    phase.line(line, at + 0.004)
    phase.line('{"error": "boom"}', at + 1)
    phase.line("  ", at + 9)  # no line: neither counted nor in the window
    phase.mark(100.0, 102.0)
    phase.mark(100.5, 104.0)
    figures = phase.figures(offered=80)
    assert figures["lines"] == 2
    assert figures["latency"]["p50"] == pytest.approx(0.004, abs=1e-6)
    assert figures["wall_s"] == 4.0
    assert figures["window_s"] == pytest.approx(0.996, abs=1e-6)
    assert figures["achieved_per_s"] == pytest.approx(2 / 0.996)


def test_cpu_per_chunk() -> None:
    spent = {"proxy": 0.3, "conmon": 0.1, "agent": 0.2, "podman service": 0.05}
    c = load.per_chunk(spent, gateway=0.6, lines=1000)
    assert c["cloud_us"] == pytest.approx(1000.0)
    assert c["cloud_by_kind_us"]["gateway"] == pytest.approx(600.0)
    assert c["agents_us"] == pytest.approx(200.0)
    assert c["podman_service_us"] == pytest.approx(50.0)
    assert load.per_chunk(spent, 0.6, 0) == {}


def test_reports_render_synthetic_results_and_defaults_match_the_issue() -> None:
    lat = {"n": 10, "p50": 0.002, "p99": 0.02, "max": 0.03}
    bucket = {
        "live": "1-100",
        "live_n": 100,
        "wall": 30.0,
        "ready": lat,
        "attach": lat,
        "pss_per_session": 12.5e6,
        "pss_per_session_by_kind": {"proxy": 9e6},
        "processes_per_session": 6.0,
        "shared_pss": 5e6,
        "podman_service_pss": 40e6,
        "gateway_pss": 80e6,
        "host_used": 9e9,
        "host_per_session": 15e6,
    }
    text = scale.report(
        {
            "buckets": [bucket],
            "streams": {"oldest": {"lines": 11, "expected": 11, "seconds": 1.0, "latency": lat}},
            "sigterm": {
                "seconds": 3.0,
                "exit": 0,
                "left": {
                    "all": {"pods": 0, "containers": 0, "networks": 0},
                    "ours": {"pods": 1, "containers": 2, "networks": 1},
                },
                "peer_close_codes": {"bridge 1001": 100},
            },
        }
    )
    assert "12.5 MB" in text and "0.05 MB" in text and "2.00 ms" in text
    assert "1 pods, 2 containers, 1 networks" in text and "bridge 1001: 100" in text
    phase = load.Phase("path")
    phase.mark(0.0, 12.0)
    phase.first_line, phase.last_line = 1.0, 11.0
    phase.lines = 4000
    figures = {**phase.figures(400), "cpu_per_chunk": load.per_chunk({"proxy": 0.4}, 0.4, 4000)}
    text = load.report({"path": figures, "added": {"p50": 0.001, "p99": 0.005}})
    assert "400" in text and "p50 1.00 ms, p99 5.00 ms" in text and "200 us" in text
    s = scale.parser().parse_args([])
    assert (s.sessions, s.bucket) == (1000, 100)
    ld = load.parser().parse_args([])
    assert (ld.streams, ld.rate, ld.users) == (200, 20, 20)
