"""Guard-patrol RFID readers on a serial port (``type = "rfid_patrol"``)."""

from drivers.rfid_patrol.driver import RfidPatrolConfig, RfidPatrolDriver
from drivers.rfid_patrol.schedule import Missed, PatrolSchedule, RoundConfig

__all__ = ["Missed", "PatrolSchedule", "RfidPatrolConfig", "RfidPatrolDriver", "RoundConfig"]
