"""Plan 'ours' in the hybrid space (prefill, decode and colocated groups side by side)."""
import sys

import thunderkv.scheduler.driver as driver
from thunderkv.scheduler.evaluate import HYBRID, SearchSpace
from thunderkv.scheduler.systems import System

real = driver.make_system


def hybrid_make_system(name, cloud, inhouse, kv_bits=4):
    if name == "thunderkv" and "--hybrid" in sys.argv:
        return System(name, cloud, SearchSpace(HYBRID), kv_bits)
    return real(name, cloud, inhouse, kv_bits)


driver.make_system = hybrid_make_system
from thunderkv.cli import main  # noqa: E402

argv = [a for a in sys.argv[1:] if a != "--hybrid"]
sys.exit(main(argv))
