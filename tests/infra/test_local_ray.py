"""The local Ray listens on loopback only: nothing it opens is reachable from another machine."""

from __future__ import annotations

import ipaddress

import psutil
import ray


def listening_addresses() -> dict[str, set[str]]:
    """LISTEN sockets of the Ray processes this driver started (GCS, raylet, workers, agents, dashboard)."""
    found: dict[str, set[str]] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.setdefault(process.name(), set()).add(conn.laddr.ip)
        except psutil.Error:
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_the_local_ray_binds_to_loopback_only(ray_local: None) -> None:
    @ray.remote
    def ping() -> int:
        return 1

    assert ray.get([ping.remote() for _ in range(2)]) == [1, 1]
    found = listening_addresses()
    assert {"gcs_server", "raylet"} <= set(found)
    assert {name: sorted(a for a in addresses if not is_loopback(a)) for name, addresses in found.items()} == {
        name: [] for name in found
    }
