"""What every request handler of one server shares."""

from __future__ import annotations

from .accesslog import AccessLog
from .config import Config
from .duration import DurationCache
from .stats import Stats


class ServerContext:
    """Settings, the resolved media root, the duration cache, statistics and access log.

    It lives apart from the server class so that the handler needs only this,
    not the server (which needs the handler).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.root.resolve()
        self.durations = DurationCache()
        self.stats = Stats(config.stats_file)
        self.access_log = AccessLog(config.access_log)
        # ``host:port`` actually listened on; the server sets it once bound.
        self.address = ""
