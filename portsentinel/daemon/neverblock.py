"""Who is never blocked: this host's addresses, its default gateways and DNS
resolvers (followed through route events) and the ignore files (read again
when they change). A broken ignore file keeps the last good list."""

from __future__ import annotations

from .. import config as configuration, logs
from ..addrset import AddressSet
from ..config import Config, ConfigError
from ..ignore import (IgnoreFilesStamp, gateway_addresses, local_addresses, never_block_set,
                      resolver_addresses)


class NeverBlock:
    def __init__(self, config: Config):
        self.host_addresses = local_addresses()
        self.moved = False  # this host's addresses changed (the packet sensor follows)
        self.automatic = self._automatic()
        self.stamp = IgnoreFilesStamp.of(config.ignore_file)
        self.current = self.read(config)

    def _automatic(self) -> list:
        return [*self.host_addresses, *gateway_addresses(), *resolver_addresses()]

    def read(self, config: Config) -> AddressSet:
        """The set for `config` (ConfigError when an ignore file is broken)."""
        return never_block_set(config.ignore_file, self.automatic,
                               configuration.where(config, "IGNORE_FILE"))

    def reloaded(self, config: Config, current: AddressSet) -> None:
        """A reload read `config`'s files (stamps them)."""
        self.stamp, self.current = IgnoreFilesStamp.of(config.ignore_file), current

    def files_changed(self, config: Config) -> bool:
        return IgnoreFilesStamp.of(config.ignore_file) != self.stamp

    def refresh(self, config: Config, log: logs.Log, force: bool = False,
                addresses: bool = False) -> AddressSet | None:
        """The new set when anything changed (this host's addresses with
        `addresses`, the ignore files, or `force`), else None."""
        changed = force
        if addresses:
            current = local_addresses()
            if set(current) != set(self.host_addresses):
                self.host_addresses, self.moved = current, True
            automatic = self._automatic()
            if set(automatic) != set(self.automatic):
                self.automatic, changed = automatic, True
        stamp = IgnoreFilesStamp.of(config.ignore_file)
        if stamp != self.stamp:  # e.g. resolv.conf changed
            self.automatic, changed = self._automatic(), True
        if not changed:
            return None
        try:
            self.current = self.read(config)
        except ConfigError as err:  # keep the last good set; say why
            log.error(f"adminalert: ERROR: ignore list not reloaded: {err}")
            return None
        self.stamp = stamp
        log(f"adminalert: ignore list loaded: {len(self.current)} entries", logs.INFO)
        return self.current
