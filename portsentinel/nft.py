"""nftables through libnftables (the library behind the `nft` command).

Each call runs a batch of nft commands inside this process: no fork per ban.
Our rules live in their own table, `inet <name>`, so we never touch the
admin's other tables, and everything we add can be removed in one command.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import threading

NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(Exception):
    pass


class Nft:
    def __init__(self):
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as err:
            raise NftError(f"libnftables not found ({err}); install the nftables package") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, commands: str, as_json: bool = False) -> str:
        with self._lock:
            self._lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_JSON if as_json else 0)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NftError(err.strip() or f"nft failed ({rc})")
        return out

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _set_for(address) -> str:
    return "ban4" if address.version == 4 else "ban6"


class NftBans:
    """The `inet <table>` table: two timeout sets and one drop rule each."""

    def __init__(self, nft: Nft, table: str = "portsentinel"):
        self.nft, self.table = nft, table

    def install(self) -> None:
        """Create the table, sets and chain; existing bans are kept (restart)."""
        t = self.table
        self.nft.run(
            f"add table inet {t}\n"
            f"add set inet {t} ban4 {{ type ipv4_addr; flags timeout; }}\n"
            f"add set inet {t} ban6 {{ type ipv6_addr; flags timeout; }}\n"
            f"add chain inet {t} prerouting {{ type filter hook prerouting priority -300; policy accept; }}\n"
            f"flush chain inet {t} prerouting\n"
            f"add rule inet {t} prerouting ip saddr @ban4 counter drop\n"
            f"add rule inet {t} prerouting ip6 saddr @ban6 counter drop\n")

    def command(self, address, timeout: float) -> str:
        ip = ipaddress.ip_address(address)  # never format anything but an address
        expiry = f" timeout {int(timeout)}s" if timeout > 0 else ""
        return f"add element inet {self.table} {_set_for(ip)} {{ {ip}{expiry} }}"

    def ban(self, address, timeout: float = 0) -> str:
        command = self.command(address, timeout)
        self.nft.run(command + "\n")
        return command

    def unban(self, address) -> bool:
        ip = ipaddress.ip_address(address)
        try:
            self.nft.run(f"delete element inet {self.table} {_set_for(ip)} {{ {ip} }}\n")
            return True
        except NftError:
            return False

    def banned(self) -> dict[str, float | None]:
        """Address -> seconds left (None when the ban has no timeout)."""
        found: dict[str, float | None] = {}
        for name in ("ban4", "ban6"):
            data = json.loads(self.nft.run(f"list set inet {self.table} {name}", as_json=True))
            for item in data.get("nftables", []):
                for element in item.get("set", {}).get("elem", []) or []:
                    if isinstance(element, dict):
                        e = element["elem"]
                        found[str(e["val"])] = e.get("expires")
                    else:
                        found[str(element)] = None
        return found

    def remove(self) -> None:
        self.nft.run(f"delete table inet {self.table}\n")
