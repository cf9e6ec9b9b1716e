"""The schedule lever keeps the lever contract (tests/levers/contract.py)."""

from contract import LeverContract

from optimize.levers import BY_NAME


class TestScheduleContract(LeverContract):
    lever = BY_NAME["schedule"]
