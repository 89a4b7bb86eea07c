"""The hostile-client scenarios of `make soak`, small: real `clipdex serve` processes (key
files, the service's defaults) against stalled and slow bodies, decode bombs, header floods,
busy uploads and a catalogue of malformed requests. Every check must hold."""

from tests.reliability.hostile import HostileConfig, failed_checks, run_hostile

SMALL = HostileConfig(stalled=8, slow_clients=4, slow_seconds=3.0, bombs=2, bomb_side=2000,
                      header_floods=2, header_mib=8, busy_uploads=20, bomb_clients=4,
                      bomb_scans=600, flood_seconds=2.0, memory_uploads=8, memory_bodies=4,
                      settle_seconds=2.5)


def test_every_hostile_scenario_holds(tiny):
    result = run_hostile(SMALL, clip=tiny)
    assert set(result["scenarios"]) == {"stalled bodies", "slow bodies", "decode bombs",
                                        "scan bomb flood", "memory returns", "header floods",
                                        "catalogue", "busy uploads"}
    assert failed_checks(result) == [], result
